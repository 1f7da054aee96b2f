"""What the server exposes: loopback by default, nothing without a login when logins are on,
no way to download the database or the adapters, no public share link unless asked for."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import psutil
import pytest

from chatbot.config import Config
from tests.serving import running_server


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_defaults_are_private():
    config = Config()
    assert config.host == "127.0.0.1"
    assert config.share is False


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("exposure")
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data / "db"),
                        "--max-new-tokens", "4", "--learn-every", "1",
                        log_path=data / "server.log") as (url, process):
        from gradio_client import Client

        client = Client(url, verbose=False)
        turn = client.predict("hello", "", api_name="/ask")
        client.predict(turn["pair_id"], "A", api_name="/vote")
        import time

        deadline = time.monotonic() + 120
        # the round's own version served (its preview's folder goes once it is not live)
        while not ((s := client.predict(api_name="/status"))["votes_pending"] == 0
                   and s["live_adapter_version"] == s["registry_live_version"] >= 1):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield url, process, data


def test_listens_on_loopback_only(server):
    _, process, _ = server
    listening = [c.laddr for c in psutil.Process(process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip in ("127.0.0.1", "::1") for address in listening)


def test_database_and_adapters_cannot_be_downloaded(server):
    url, _, data = server
    db = data / "db" / "duet.db"
    from chatbot.store import Store

    folder = data / "db" / "adapters" / Store(db).live_adapter()["path"]
    manifest, weights = folder / "manifest.json", folder / "adapter_model.safetensors"
    assert db.exists() and manifest.exists()
    for path in (db, manifest, weights, data / "db" / "learner.log"):
        for route in (f"gradio_api/file={path}", f"file={path}", f"gradio_api/file/{path}"):
            status, body = get(url + route)
            assert status >= 400, (route, status)
            assert not body.startswith(b"SQLite format"), route


def test_no_share_link_unless_asked(server):
    _, _, data = server
    log = (data / "server.log").read_text()
    assert "gradio.live" not in log


def test_api_needs_a_login_when_logins_are_on(tiny_model_dir, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("alice:wonderland\n")
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "db"),
                        "--no-learner", "--auth-file", str(users),
                        log_path=tmp_path / "server.log") as (url, _):
        for route in ("config", "gradio_api/info"):
            status, _ = get(url + route)
            assert status in (401, 403), (route, status)
        for route in ("gradio_api/call/ask", "gradio_api/run/ask", "gradio_api/queue/join"):
            status, _ = post(url + route, {"data": ["hello", ""]})
            assert status in (401, 403), (route, status)
        from gradio_client.exceptions import AuthenticationError

        with pytest.raises(AuthenticationError):
            from gradio_client import Client

            Client(url, verbose=False)
