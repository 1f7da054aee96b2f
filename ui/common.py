"""What every handler needs: who is asking, how errors reach the user, how text is shown.

Text from a user or the model is shown as Markdown (lists, code blocks, emphasis), never as
HTML: outside code, every `<` that could open a tag or comment and every `&` that could
spell an entity is escaped, so `<script>` or `<b onmouseover=...>` shows as the characters
that were written. Code (fenced blocks and `inline` spans) is left alone: the Markdown
renderer escapes it itself. Behind this, Gradio's chatbot still sanitises the rendered HTML
(no scripts, event handlers or javascript: links), which covers any text this splitter reads
differently from the renderer.

Left out: indented (4-space) code blocks, which are read as text: a `<` in them shows as
"&lt;".
"""

from __future__ import annotations

import functools
import inspect
import logging
import re

import gradio as gr

from chatbot.errors import DuetError

log = logging.getLogger(__name__)

LOCAL_USER = "local"


def user_of(request: gr.Request | None) -> str:
    """The authenticated user name, or the single local user when auth is off."""
    return (getattr(request, "username", None) if request is not None else None) or LOCAL_USER


def user_errors(fn):
    """Show DuetError to the user as a clear message; hide anything else behind a short one."""

    def convert(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, DuetError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error("something went wrong on the server; it has been logged",
                        print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - converted, not swallowed
                raise convert(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise convert(exc) from None
    return wrapper


# A fence line opens or closes a code block: ``` or ~~~ (3 or more), indented or not.
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# An inline code span: a run of backticks, then anything up to the same run (no blank line).
_CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.S)
# What could start markup: a tag, end tag, comment or declaration; an entity.
_MARKUP = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?\w+;)")


def _escape_markup(text: str) -> str:
    return _MARKUP.sub(lambda m: "&lt;" if m.group() == "<" else "&amp;", text)


def _escape_outside_code_spans(text: str) -> str:
    parts, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        parts += [_escape_markup(text[last:span.start()]), span.group()]
        last = span.end()
    return "".join(parts) + _escape_markup(text[last:])


def _split_fences(text: str) -> tuple[list[tuple[bool, str]], str | None]:
    """Runs of (is_code, lines) and the fence still open at the end (None if all closed)."""
    runs: list[tuple[bool, str]] = []
    fence, lines = None, []
    for line in text.splitlines(keepends=True):
        found = _FENCE.match(line)
        if fence is None and found:
            runs.append((False, "".join(lines)))
            fence, lines = found.group(1), [line]
        elif fence is not None and found and found.group(1)[0] == fence[0] \
                and len(found.group(1)) >= len(fence) and not line[found.end():].strip():
            runs.append((True, "".join(lines) + line))
            fence, lines = None, []
        else:
            lines.append(line)
    runs.append((fence is not None, "".join(lines)))
    return runs, fence


def bind(fn, *first):
    """`fn` with its first arguments fixed, as Gradio sees it: the rest of its signature, with
    its type hints (functools.partial hides them, and with them the gr.Request)."""
    signature = inspect.signature(fn)
    rest = list(signature.parameters.values())[len(first):]
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            yield from fn(*first, *args, **kwargs)
    else:
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            return fn(*first, *args, **kwargs)
    bound.__signature__ = signature.replace(parameters=rest)
    return bound


def as_markdown(text: str) -> str:
    """The Markdown source that shows `text` with its Markdown rendered and no HTML."""
    runs, _ = _split_fences(text)
    return "".join(run if code else _escape_outside_code_spans(run) for code, run in runs)


def chatbot(label: str, elem_id: str | None, min_height: int, max_height: int,
            **kwargs) -> gr.Chatbot:
    """A pane of messages that grows with them between the two heights, then scrolls.
    Markdown on, HTML sanitised, no custom tags kept (ui/common.py says what is escaped)."""
    return gr.Chatbot(label=label, elem_id=elem_id, height=None, min_height=min_height,
                      max_height=max_height, render_markdown=True, sanitize_html=True,
                      allow_tags=False, elem_classes=["no-clear"], **kwargs)


def reply_markdown(text: str, cut_at: int | None = None) -> str:
    """A reply as Markdown; one cut by the length limit ends with a mark saying so (after
    closing a code block the cut left open, so the mark is not read as code)."""
    shown = as_markdown(text)
    if cut_at:
        _, fence = _split_fences(text)
        if fence:
            shown += "\n" + fence
        shown += f"\n\n*✂ cut at {cut_at} tokens*"
    return shown
