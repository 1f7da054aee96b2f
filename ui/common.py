"""What every handler needs: who is asking, how errors reach the user, how text is shown."""

from __future__ import annotations

import functools
import html
import inspect
import logging

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


def as_text(content: str) -> str:
    """Escape HTML so the chat shows exactly the characters that were written."""
    return html.escape(content, quote=False)


