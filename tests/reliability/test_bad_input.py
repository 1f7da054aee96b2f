"""Bad input through the API and the page: each gets a clear error and changes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from gradio_client import Client

from tests.serving import running_server

TABLES = ["conversations", "messages", "pairs", "replies", "votes", "ratings"]


def counts(db_path: Path) -> dict:
    db = sqlite3.connect(db_path)
    try:
        return {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}
    finally:
        db.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("bad-input")
    users = data / "users.txt"
    users.write_text("alice:wonderland\nbob:builder\n")
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data / "db"),
                        "--no-learner", "--max-new-tokens", "6", "--auth-file", str(users),
                        "--max-message-chars", "200", log_path=data / "server.log") as (url, _):
        alice = Client(url, auth=("alice", "wonderland"), verbose=False)
        bob = Client(url, auth=("bob", "builder"), verbose=False)
        turn = alice.predict("a fine question", "", api_name="/ask")
        yield url, data / "db" / "duet.db", alice, bob, turn


@pytest.mark.parametrize("message,expected", [
    ("", "empty"), ("   \n\t  ", "empty"), ("x" * 201, "at most 200"),
    ("binary\x00\x01data", "control characters"),
])
def test_bad_messages(server, message, expected):
    _, db, alice, _, _ = server
    before = counts(db)
    with pytest.raises(Exception, match=expected):
        alice.predict(message, "", api_name="/ask")
    assert counts(db) == before


def test_lone_surrogate_sent_as_raw_json(server):
    """gradio_client cannot even encode a lone surrogate, so send the JSON by hand."""
    import httpx

    url, db, _, _, _ = server
    before = counts(db)
    with httpx.Client(base_url=url, timeout=30) as http:
        http.post("login", data={"username": "alice", "password": "wonderland"})
        body = '{"data": ["a lone \\ud800 surrogate", ""]}'
        event = http.post("gradio_api/call/ask", content=body,
                          headers={"content-type": "application/json"}).json()["event_id"]
        answer = http.get(f"gradio_api/call/ask/{event}").text
    assert "event: error" in answer and "invalid Unicode" in answer
    assert counts(db) == before


@pytest.mark.parametrize("who,pair,choice,expected", [
    ("alice", "no-such-pair", "A", "no pair"),
    ("alice", None, "C", "choice must be one of"),
    ("alice", None, "", "choice must be one of"),
    ("bob", None, "A", "no pair"),  # another user's pair is not there for bob
])
def test_bad_votes(server, who, pair, choice, expected):
    _, db, alice, bob, turn = server
    before = counts(db)
    client = alice if who == "alice" else bob
    with pytest.raises(Exception, match=expected):
        client.predict(pair or turn["pair_id"], choice, api_name="/vote")
    assert counts(db) == before


def test_second_vote_and_bad_ratings(server):
    _, db, alice, bob, _ = server
    turn = alice.predict("another question", "", api_name="/ask")
    alice.predict(turn["pair_id"], "B", api_name="/vote")
    before = counts(db)
    with pytest.raises(Exception, match="already has a vote"):
        alice.predict(turn["pair_id"], "A", api_name="/vote")
    with pytest.raises(Exception, match="side must be A or B"):
        alice.predict(turn["pair_id"], "C", "up", api_name="/rate")
    with pytest.raises(Exception, match="thumb must be up or down"):
        alice.predict(turn["pair_id"], "A", "meh", api_name="/rate")
    with pytest.raises(Exception, match="no pair"):
        bob.predict(turn["pair_id"], "A", "down", api_name="/rate")
    with pytest.raises(Exception, match="no conversation"):
        bob.predict("hijack", turn["conversation_id"], api_name="/ask")
    assert counts(db) == before


def test_missing_or_wrong_login(server):
    from gradio_client.exceptions import AuthenticationError

    url, db, _, _, _ = server
    before = counts(db)
    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)
    with pytest.raises(Exception, match="(?i)login|credentials|401|403|incorrect"):
        Client(url, auth=("alice", "guess"), verbose=False)
    assert counts(db) == before


def test_bad_input_in_the_page(server):
    import shutil

    from tests.test_browser import CHROMIUM, login

    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    url, db, _, _, _ = server
    before = counts(db)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page, dialogs = login(browser, url, "alice", "wonderland")
        page.fill("#message textarea", "    ")
        page.click("#send")  # whitespace only: nothing happens
        page.wait_for_timeout(1500)
        assert counts(db) == before
        page.evaluate("""() => {  // paste past the box's own length limit
            const box = document.querySelector('#message textarea');
            box.removeAttribute('maxlength');
        }""")
        page.fill("#message textarea", "y" * 300)
        page.click("#send")
        page.wait_for_selector("text=at most 200", timeout=15_000)
        assert counts(db) == before
        assert page.locator("#vote-A").is_disabled()
        assert dialogs == []
        browser.close()
