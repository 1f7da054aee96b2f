"""The chat page in a real headless Chromium over the fake generator (no model, one page served
in-process per test): Markdown renders while nothing injected runs and every request stays on
this machine, the cut mark and Continue, the sidebar of conversations, the learning tab.
Screenshots land in artifacts/ (git-ignored). The edits' handlers are called directly, over
the fake generator's service."""

from __future__ import annotations

import contextlib
from pathlib import Path

import gradio as gr
import pytest

from chatbot.config import Config
from chatbot.service import CONTINUE_MESSAGE, ChatService
from tests.conftest import FakeGenerator
from tests.serving import ROOT, free_port
from tests.test_browser import CHROMIUM, browser  # noqa: F401 - the browser fixture

ARTIFACTS = ROOT / "artifacts"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="Debian's chromium is not installed")

# Every way a reply could try to run script, beside Markdown that must render.
ATTACK = """Here is a plan:

1. Choose the right guitar
2. Learn chords

```python
print("<b>hi</b>")
```

<script>window.__pwned=1</script>
<img src=x onerror="window.__pwned=1">
[click me](javascript:window.__pwned=1)
<a href="javascript:window.__pwned=1">raw link</a>
<b onmouseover="window.__pwned=1">hover me</b>
<svg onload="window.__pwned=1"></svg> `<img src=y onerror="window.__pwned=1">`
$$\\href{javascript:window.__pwned=1}{math link}$$"""
# Elements that must not be in a rendered message (Gradio's own copy button on a code block has
# an svg icon).
INERT = ("script, img, svg:not(.copy_code_button *), iframe, object, [onerror], [onload], "
         "[onmouseover], a[href^='javascript' i]")


@contextlib.contextmanager
def page_over(generator: FakeGenerator, tmp_path: Path, browser):  # noqa: F811
    """The page over `generator`, launched as app.py launches it, open in a browser tab that
    records every request and dialog."""
    from chatbot.store import Store
    from ui.app import CSS, THEME, build_ui

    store = Store(tmp_path / "duet.db")
    service = ChatService(Config(data_dir=tmp_path), store, generator, model_id="fake")
    demo = build_ui(service)
    demo.queue()
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True, theme=THEME,
                css=CSS)
    tab = browser.new_page(viewport={"width": 1400, "height": 1100})
    tab.requests, tab.dialogs = [], []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    try:
        tab.goto(demo.local_url)
        tab.wait_for_selector("#message textarea", timeout=30_000)
        yield tab, store, demo.local_url
    finally:
        tab.close()
        demo.close()
        store.close()


def send(tab, text: str) -> None:
    tab.fill("#message textarea", text)
    tab.click("#send")
    tab.wait_for_selector("#vote-A:not([disabled])", timeout=30_000)


def vote(tab, choice: str) -> None:
    tab.click(f"#vote-{choice}")
    tab.wait_for_selector(f"#vote-{choice}[disabled]", timeout=30_000)


def assert_inert(tab, pane: str) -> None:
    """Nothing that could run is in the pane's messages, and poking at what is there runs
    nothing."""
    content = f"{pane} .message-content"
    tab.wait_for_function(f"document.querySelector('{pane} ol') !== null", timeout=10_000)
    assert tab.locator(f"{content} :is({INERT})").count() == 0
    url = tab.url
    tab.locator(content).get_by_text("click me", exact=True).last.click()  # a link, no href
    tab.locator(content).get_by_text("hover me").last.hover()
    tab.wait_for_timeout(300)
    assert tab.evaluate("window.__pwned") is None
    assert tab.url == url


@needs_chromium
def test_markdown_renders_and_nothing_injected_runs_or_leaves_the_machine(tmp_path,
                                                                         browser):  # noqa: F811
    generator = FakeGenerator(replies=(ATTACK, "A plain reply"))
    with page_over(generator, tmp_path, browser) as (tab, _, url):
        send(tab, 'Hi <img src=x onerror="window.__pwned=1"> **there**')
        tab.wait_for_selector("#reply-a pre code .token", timeout=10_000)  # highlighted
        assert tab.locator("#reply-a ol > li").all_inner_texts() == [
            "Choose the right guitar", "Learn chords"]
        assert tab.inner_text("#reply-a pre code").strip() == 'print("<b>hi</b>")'
        shown = tab.inner_text("#reply-a .message-content")
        for written in ("<script>window.__pwned=1</script>", '<b onmouseover="window.__pwned=1">',
                        '<img src=y onerror="window.__pwned=1">'):
            assert written in shown  # shown as the characters that were written
        assert_inert(tab, "#reply-a")
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=ARTIFACTS / "chat-markdown.png", full_page=True)

        vote(tab, "A")  # the chosen reply moves into the conversation, still inert
        assert tab.locator("#history .message-content strong").first.inner_text() == "there"
        assert_inert(tab, "#history")
        assert tab.locator("#conversations img").count() == 0
        assert 'Hi <img src=x onerror="window.__pwned=1…' in tab.inner_text("#conversations")
        assert tab.dialogs == []
        host = url.split("/")[2]
        assert tab.requests and {r.split("/")[2] for r in tab.requests} == {host}

        # the control: the same markup inserted raw does run in this browser
        tab.evaluate("""document.body.insertAdjacentHTML('beforeend',
                        '<img src=x onerror="window.__pwned=1">')""")
        tab.wait_for_function("window.__pwned === 1", timeout=5_000)


@needs_chromium
def test_a_cut_reply_is_marked_and_continue_asks_for_more(tmp_path, browser):  # noqa: F811
    generator = FakeGenerator(replies=("The first steps are", "Start with"),
                              finish_reason="length")
    with page_over(generator, tmp_path, browser) as (tab, store, _):
        send(tab, "Tell me how to learn the guitar")
        for pane in ("#reply-a", "#reply-b"):
            assert "cut at 8 tokens" in tab.inner_text(pane)
        assert not tab.locator("#continue").is_visible()  # vote first
        vote(tab, "B")
        assert "Start with" in tab.inner_text("#history")
        assert "cut at 8 tokens" in tab.inner_text("#history")
        tab.wait_for_selector("#continue", state="visible", timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=ARTIFACTS / "chat-cut.png", full_page=True)

        generator.finish_reason = "stop"
        generator.replies = ("so on and so forth.", "practise every day.")
        generator.block.clear()  # hold the replies back: the request shows at once
        tab.click("#continue")
        tab.wait_for_function(f"document.querySelector('#history').innerText"
                              f".includes({CONTINUE_MESSAGE!r})", timeout=10_000)
        assert tab.locator("#vote-A").is_disabled()
        generator.block.set()
        tab.wait_for_selector("#vote-A:not([disabled])", timeout=30_000)
        assert "cut at" not in tab.inner_text("#reply-a")
        vote(tab, "A")
        assert "so on and so forth." in tab.inner_text("#history")
        assert not tab.locator("#continue").is_visible()  # this one ended on its own
        [conversation] = store.conversations("local")
        assert [m["content"] for m in store.messages(conversation["id"])] == [
            "Tell me how to learn the guitar", "Start with", CONTINUE_MESSAGE,
            "so on and so forth."]


@needs_chromium
def test_the_sidebar_lists_conversations_newest_first_and_opens_them(tmp_path,
                                                                     browser):  # noqa: F811
    with page_over(FakeGenerator(), tmp_path, browser) as (tab, _, _):
        long = "A third question that goes on and on about chords, scales and rhythm"
        for text in ("First question", "Second question", long):
            send(tab, text)
            vote(tab, "A")
            tab.click("#new")
            tab.wait_for_function("document.querySelector('#history').innerText"
                                  ".includes('Say something')", timeout=10_000)
        tab.wait_for_function("document.querySelectorAll('#conversations label').length == 3",
                              timeout=10_000)
        titles = tab.locator("#conversations label").all_inner_texts()
        assert [t.strip() for t in titles] == [long[:39] + "…", "Second question",
                                               "First question"]
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=ARTIFACTS / "sidebar.png", full_page=True)

        tab.locator("#conversations label").filter(has_text="First question").click()
        tab.wait_for_function("document.querySelector('#history').innerText"
                              ".includes('First question')", timeout=10_000)
        assert "reply A" in tab.inner_text("#history")
        assert "Second question" not in tab.inner_text("#history")
        send(tab, "A follow-up")  # the conversation goes on, and moves to the top
        vote(tab, "B")
        tab.wait_for_function("document.querySelector('#conversations label').innerText"
                              ".includes('First question')", timeout=10_000)


def test_markup_outside_code_is_escaped_and_code_is_left_to_the_renderer():
    from ui.common import as_markdown, reply_markdown

    assert as_markdown("a <b>x</b> <!-- c --> &amp; & a < b, **bold** `<i>`") == (
        "a &lt;b>x&lt;/b> &lt;!-- c --> &amp;amp; & a < b, **bold** `<i>`")
    fenced = "1. one\n2. two\n\n```html\n<script>x()</script>\n```\nafter <img src=x>"
    assert as_markdown(fenced) == fenced.replace("<img", "&lt;img")
    assert as_markdown("~~~\n<b>\n") == "~~~\n<b>\n"  # unclosed: code to the end
    assert as_markdown("``not a span <b>") == "``not a span &lt;b>"
    assert reply_markdown("done", None) == "done"
    cut = reply_markdown("```py\nx = '<b>'", 64)
    assert cut == "```py\nx = '<b>'\n```\n\n*✂ cut at 64 tokens*"  # the fence closed first


def test_one_round_draws_a_point_on_whole_numbered_axes():
    from ui.dashboard import curve_figure, curves

    quality, kl = curves([{"status": "live", "reward": 0.5, "live_heldout_acc": 0.75,
                           "kl": 0.02, "beta": 0.05}])
    axes = curve_figure(quality, "quality", "share").axes[0]
    assert [line.get_marker() for line in axes.lines] == ["o", "o"]
    assert [list(line.get_xdata()) for line in axes.lines] == [[1], [1]]
    assert [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]] \
        == [1]
    assert len(curve_figure(kl, "kl", "per token").axes[0].lines) == 2
    empty = curve_figure(quality.iloc[0:0], "quality", "share").axes[0]
    assert len(empty.lines) == 0 and "no learner round yet" in empty.texts[0].get_text()


@needs_chromium
def test_the_learning_tab_plots_one_round_and_shows_what_changed(tmp_path,
                                                                 browser):  # noqa: F811
    generator = FakeGenerator(adapter_version=1)
    with page_over(generator, tmp_path, browser) as (tab, store, _):
        for text in ("How do I tune a guitar?", "What is a chord?"):
            send(tab, text)
            vote(tab, "A")
            tab.click("#new")
            tab.wait_for_function("document.querySelector('#history').innerText"
                                  ".includes('Say something')", timeout=10_000)
        store.finish_round("round-1", {"version": 1, "path": "v1", "parent_version": 0,
                                       "base_model": "fake", "sha256": "x", "status": "live"},
                           {"status": "live", "adapter_version": 1, "reward": 0.5,
                            "live_heldout_acc": 0.75, "judged_pairs": 2, "kl": 0.02,
                            "beta": 0.05})
        tab.get_by_role("tab", name="Learning").click()
        tab.wait_for_selector("#quality-plot img", timeout=30_000)
        assert tab.locator("#kl-plot img").count() == 1
        tab.click("#compare")
        tab.wait_for_selector("#compare-0", state="visible", timeout=30_000)
        first = tab.inner_text("#compare-0")
        assert "What is a chord?" in first
        assert "v0 on What is a chord?" in first and "v1 on What is a chord?" in first
        assert "Live adapter v1" in first
        assert "How do I tune a guitar?" in tab.inner_text("#compare-1")
        assert not tab.locator("#compare-2").is_visible()  # two prompts, two rows
        ARTIFACTS.mkdir(exist_ok=True)
        tab.screenshot(path=ARTIFACTS / "learning.png", full_page=True)


# --- edits, through the handlers ------------------------------------------------------------

def chat_page(service):
    from ui import chat

    with gr.Blocks():
        conversations, new = chat.build_sidebar()
        with gr.Tabs() as tabs, gr.Tab("Chat", id="chat"):
            return chat.build(service, tabs, conversations, new)


def asked(page, text: str, conv_id: str = "", chat_shown: list | None = None) -> dict:
    """Send `text` as the page does (show, then stream the pair); the last update."""
    from ui import chat

    shown = chat.show_message(page, text, conv_id, chat_shown or [], None)
    *_, done = chat.answer(page, shown[page.pending], conv_id, shown[page.history], None)
    return {**shown, **done}


def saved(page, pair_id: str, side: str, text: str, conv_id: str) -> dict:
    """Save an edit as the page does (store it, then show the conversation as stored)."""
    from ui import chat

    assert chat.save_edit(page, pair_id, side, text, None) is None
    return chat.open_conversation(page, conv_id, None)


def test_editing_reply_b_of_an_open_pair_answers_the_turn_and_the_conversation_goes_on(
        service, store):
    from ui import chat

    page = chat_page(service)
    turn = asked(page, "How do I tune a guitar?")
    conv_id, pair_id = turn[page.conversation_id], turn[page.pair_id]
    assert turn[page.edits["B"]].interactive and not turn[page.edits[""]].visible
    editing = chat.open_editor(page, "B", conv_id, None)
    assert editing[page.editor].visible
    assert (editing[page.edit_pair], editing[page.edit_side]) == (pair_id, "B")
    assert editing[page.edit_text].value == "reply B"  # the reply as stored, to rewrite
    assert editing[page.edit_preview] == [{"role": "assistant", "content": "reply B"}]

    shown = saved(page, pair_id, "B", "Tune the *low E* first.", conv_id)
    assert [m["content"] for m in shown[page.history]] == [
        "How do I tune a guitar?", "Tune the *low E* first."]
    assert shown[page.pair_id] == "" and shown[page.reply_b] == []
    assert not shown[page.editor].visible and not shown[page.votes["A"]].interactive
    assert shown[page.edits[""]].visible  # the edit can be edited again
    (correction,) = store.corrections()
    assert (correction["pair_id"], correction["side"], correction["text"]) == (
        pair_id, "B", "Tune the *low E* first.")
    assert store.pair("local", pair_id)["status"] == "corrected"

    asked(page, "And then?", conv_id, shown[page.history])
    assert service.generator.prompts[-1][1] == {"role": "assistant",
                                                "content": "Tune the *low E* first."}


def test_the_last_reply_can_be_edited_after_the_vote(service, store):
    from ui import chat

    page = chat_page(service)
    turn = asked(page, "Hi")
    conv_id, pair_id = turn[page.conversation_id], turn[page.pair_id]
    voted = chat.vote_on_pair(page, "B", pair_id, conv_id, None)
    assert voted[page.edits[""]].visible and not voted[page.edits["A"]].interactive
    with pytest.raises(gr.Error, match="no reply to edit"):
        chat.open_editor(page, "A", conv_id, None)  # the pair was voted on
    editing = chat.open_editor(page, "", conv_id, None)
    assert (editing[page.edit_pair], editing[page.edit_side]) == (pair_id, "")
    assert editing[page.edit_text].value == "reply B"  # the reply the vote chose
    shown = saved(page, pair_id, "", "Hello!", conv_id)
    assert [m["content"] for m in shown[page.history]] == ["Hi", "Hello!"]
    assert [(c["pair_id"], c["side"], c["text"]) for c in store.corrections()] == [
        (pair_id, None, "Hello!")]
    assert [v["choice"] for v in store.votes()] == ["B"]  # kept beside the edit


def test_a_bad_edit_is_refused_clearly_and_changes_nothing(service, store):
    from ui import chat

    page = chat_page(service)
    with pytest.raises(gr.Error, match="no reply to edit"):
        chat.open_editor(page, "", "", None)  # a new conversation: nothing yet
    turn = asked(page, "Hi")
    conv_id, pair_id = turn[page.conversation_id], turn[page.pair_id]
    before = store.messages(conv_id)
    for text, problem in [("  \n ", "the edited reply is empty"),
                          ("x" * 201, "the edited reply is 201 characters long")]:
        with pytest.raises(gr.Error, match=problem):
            chat.save_edit(page, pair_id, "A", text, None)
    with pytest.raises(gr.Error, match="no reply being edited"):
        chat.save_edit(page, "", "A", "text", None)
    with pytest.raises(gr.Error, match="no pair"):
        chat.save_edit(page, "not-a-pair", "A", "text", None)
    assert store.corrections() == [] and store.messages(conv_id) == before
    assert store.pair("local", pair_id)["status"] == "open"  # still waits for its vote


def test_the_preview_renders_an_edit_as_replies_are_rendered(service):
    from ui import chat

    page = chat_page(service)
    text = '  **Bold** <img src=x onerror="window.__pwned=1"> `<b>` \n'
    (shown,) = chat.preview_edit(page, text)[page.edit_preview]
    assert shown["content"] == '**Bold** &lt;img src=x onerror="window.__pwned=1"> `<b>`'
    assert chat.preview_edit(page, " ")[page.edit_preview] == []
