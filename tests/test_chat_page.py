"""The chat page in a real headless Chromium over the fake generator (no model, one page served
in-process per test): Markdown renders while nothing injected runs and every request stays on
this machine, the cut mark and Continue, the sidebar of conversations, the learning tab.
Screenshots land in artifacts/ (git-ignored)."""

from __future__ import annotations

import contextlib
from pathlib import Path

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
