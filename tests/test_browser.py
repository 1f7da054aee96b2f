"""The page as a person uses it, in a real headless Chromium (Debian's, driven by Playwright),
against a real server with two logins. Screenshots land in artifacts/ (git-ignored)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chatbot.store import Store
from tests.serving import ROOT, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed "
                                        "(make test installs it)")]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-data")
    users = data / "users.txt"
    users.write_text("# two users\nalice:wonderland\nbob:builder\n")
    users.chmod(0o600)
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data / "db"),
                        "--no-learner", "--max-new-tokens", "10", "--auth-file", str(users),
                        "--admin", "alice", log_path=data / "server.log") as (url, _):
        yield url, data / "db"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def login(browser, url, user, password):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.fill("input[type=text]", user)
    page.fill("input[type=password]", password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#message textarea", timeout=30_000)
    return page, dialogs


def send(page, text):
    page.fill("#message textarea", text)
    page.click("#send")
    page.wait_for_selector("#vote-A:not([disabled])", timeout=60_000)


def test_chat_vote_history_and_isolation(server, browser):
    url, data = server
    page, dialogs = login(browser, url, "alice", "wonderland")
    assert page.locator("#vote-A").is_disabled()  # nothing to vote on yet
    send(page, "Hello <script>alert('x')</script> <img src=x onerror=alert('y')> **bold**")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)
    reply_a = page.inner_text("#reply-a .message-row, #reply-a [data-testid=bot]").strip()
    assert reply_a
    page.click("#vote-A")
    page.wait_for_selector("#vote-A[disabled]", timeout=30_000)

    # the vote is in the DB, by alice, and the chosen reply is in the conversation
    store = Store(data / "duet.db")
    votes = store.votes()
    assert [(v["user_id"], v["choice"]) for v in votes] == [("alice", "A")]
    history_text = page.inner_text("#history")
    assert reply_a in history_text
    # Markdown renders, markup is shown as text and never ran
    assert "<script>alert('x')</script>" in history_text
    assert "**bold**" not in history_text
    assert page.locator("#history strong").first.inner_text() == "bold"
    assert page.locator("#history .message-content script").count() == 0
    assert page.locator("#history .message-content img").count() == 0
    assert dialogs == []

    # the conversation is in the sidebar, and opens from there
    page.wait_for_function(
        "document.querySelector('#conversations').innerText.includes('Hello')", timeout=30_000)
    page.click("#new")
    page.wait_for_function("!document.querySelector('#history').innerText.includes('bold')")
    page.locator("#conversations label").filter(has_text="Hello").click()
    page.wait_for_function("document.querySelector('#history').innerText.includes('bold')",
                           timeout=30_000)

    # the dashboard shows the vote; alice is an admin and sees the rollback control
    page.get_by_role("tab", name="Learning").click()
    page.wait_for_function(
        "document.querySelector('#learning-status').innerText.includes('1 total')",
        timeout=30_000)
    assert page.locator("#rollback").is_visible()
    page.screenshot(path=ARTIFACTS / "dashboard.png", full_page=True)

    # bob sees none of it
    other, _ = login(browser, url, "bob", "builder")
    send(other, "Bob here")
    other.wait_for_function(
        "document.querySelector('#conversations').innerText.includes('Bob here')",
        timeout=30_000)
    assert "Hello" not in other.inner_text("#conversations")
    other.get_by_role("tab", name="Learning").click()
    other.wait_for_timeout(1000)
    assert not other.locator("#rollback").is_visible()
    other.close()
    page.close()


INJECTED = ('My **own** answer <img src=x onerror="window.__pwned=1"> '
            '<script>window.__pwned=1</script>')


def history_includes(page, text: str) -> None:
    page.wait_for_function(f"document.querySelector('#history').innerText.includes({text!r})",
                           timeout=30_000)


def test_an_edited_reply_is_stored_shown_inert_and_the_conversation_goes_on(server, browser):
    url, data = server
    page, dialogs = login(browser, url, "alice", "wonderland")
    send(page, "Please answer, then let me edit")
    page.click("#edit-b")
    page.wait_for_selector("#editor", state="visible", timeout=30_000)
    assert page.input_value("#edit-text textarea")  # prefilled with reply B
    page.fill("#edit-text textarea", INJECTED)
    page.wait_for_selector("#edit-preview strong", timeout=30_000)  # the live preview
    assert page.locator("#edit-preview strong").inner_text() == "own"
    assert '<img src=x onerror="window.__pwned=1">' in page.inner_text("#edit-preview")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "edit.png", full_page=True)

    page.click("#save-edit")
    history_includes(page, "<script>window.__pwned=1</script>")
    page.wait_for_selector("#editor", state="hidden", timeout=30_000)
    assert page.locator("#history strong").last.inner_text() == "own"
    for pane in ("#history", "#edit-preview"):
        assert page.locator(f"{pane} .message-content :is(img, script)").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#vote-A").is_disabled()  # the edit answered the turn
    assert page.locator("#edit-last").is_visible()
    store = Store(data / "duet.db")
    try:
        (correction,) = [c for c in store.corrections() if c["user_id"] == "alice"]
        assert (correction["side"], correction["text"]) == ("B", INJECTED)
        send(page, "And after that?")  # the conversation goes on from the edit
        history_includes(page, "And after that?")
        pair = store.pair("alice", correction["pair_id"])
        assert [m["content"] for m in store.messages(pair["conversation_id"])] == [
            "Please answer, then let me edit", INJECTED, "And after that?"]
    finally:
        store.close()
    assert page.evaluate("window.__pwned") is None and dialogs == []
    page.close()


def test_wrong_password_is_refused(server, browser):
    url, _ = server
    page = browser.new_page()
    page.goto(url)
    page.fill("input[type=text]", "alice")
    page.fill("input[type=password]", "not-her-password")
    page.get_by_role("button", name="Login").click()
    page.wait_for_timeout(1500)
    assert page.locator("#message").count() == 0
    page.close()


def test_api_needs_login_and_keeps_users_apart(server):
    from gradio_client import Client

    url, _ = server
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(url, verbose=False).predict("hi", "", api_name="/ask")
    with pytest.raises(Exception, match="(?i)login|credentials|401|403"):
        Client(url, auth=("alice", "wrong"), verbose=False)
    alice = Client(url, auth=("alice", "wonderland"), verbose=False)
    bob = Client(url, auth=("bob", "builder"), verbose=False)
    pair = alice.predict("A question from alice", "", api_name="/ask")
    with pytest.raises(Exception, match="no pair"):
        bob.predict(pair["pair_id"], "B", api_name="/vote")
    with pytest.raises(Exception, match="no conversation"):
        bob.predict("let me in", pair["conversation_id"], api_name="/ask")
    assert alice.predict(pair["pair_id"], "B", api_name="/vote")["ok"] is True
