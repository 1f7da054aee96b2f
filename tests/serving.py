"""Start a real `python app.py` server on a free local port for a test, and stop it after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float, every: float = 0.25):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(*args: str, log_path: Path, timeout: float = 180.0):
    """Yield the base URL of a server started with `app.py args`; its output goes to log_path."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *args], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n"
                                   + log_path.read_text()[-3000:])
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not start:\n"
                                       + log_path.read_text()[-3000:]) from None
                time.sleep(0.1)
        yield url, process
    except BaseException:
        # A failing test shows why the server failed: its traceback is in this log, which the
        # report would not show otherwise (pytest prints a failing test's captured output).
        print(f"--- the server's log ({log_path}), last {LOG_TAIL} characters ---")
        print(_tail(log_path))
        learner_log = _learner_log(args)
        if learner_log is not None and learner_log.exists():
            print(f"--- the learner's log ({learner_log}), last {LOG_TAIL} characters ---")
            print(_tail(learner_log))
        raise
    finally:
        stop_process_group(process, grace=20)



def a_pair_through_the_app(*args: str, data_dir: Path, log_path: Path,
                           messages: list[dict]) -> None:
    """Start `app.py args --no-learner --data-dir data_dir`, stream a pair through its
    OpenAI-compatible API (the choices' indexes are A and B), vote on it, and check that the
    store holds both replies as streamed, each with a log-prob per token."""
    import openai

    from chatbot.config import Config
    from chatbot.store import Store

    with running_server(*args, "--no-learner", "--data-dir", str(data_dir),
                        "--max-new-tokens", "8", log_path=log_path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}v1", api_key="x", max_retries=0, timeout=120)
        texts, pair_id = {0: "", 1: ""}, None
        for chunk in client.chat.completions.create(model="duet", n=2, stream=True,
                                                    messages=messages):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
            pair_id = pair_id or getattr(chunk, "pair_id", None)
        assert pair_id and all(texts.values())
        vote = client.post("/feedback", body={"pair_id": pair_id, "choice": "A"},
                           cast_to=object)
        assert vote["ok"] is True
    pair = Store(Config(data_dir=data_dir).db_path).pair("local", pair_id)
    assert [r["text"] for r in pair["replies"]] == [texts[0].strip(), texts[1].strip()]
    assert all(len(r["token_logprobs"]) == r["n_tokens"] for r in pair["replies"])


LOG_TAIL = 6000


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL:]


def _learner_log(args: tuple[str, ...]) -> Path | None:
    """The learner's log file under the server's --data-dir, if the test named one."""
    if "--data-dir" in args[:-1]:
        return Path(args[args.index("--data-dir") + 1]) / "learner.log"
    return None


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM a process started with start_new_session=True and its children; SIGKILL them
    after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
