"""build_ui(service) -> gr.Blocks: the chat page and the public API (/ask /vote /rate /status).

Handlers are thin: they find out who is asking (Gradio's authenticated request, never a form
field), call ChatService, and turn DuetError into gr.Error. All state a user owns lives in
gr.State or the DB; nothing here is shared between users.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr

from chatbot.errors import DuetError
from chatbot.service import ChatService
from chatbot.store import CHOICES

log = logging.getLogger(__name__)

LOCAL_USER = "local"
CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


def user_of(request: gr.Request | None) -> str:
    """The authenticated user name, or the single local user when auth is off."""
    return (request.username if request is not None else None) or LOCAL_USER


def user_errors(fn):
    """Show DuetError to the user as a clear message; hide anything else behind a short one."""

    def convert(exc: Exception) -> Exception:
        if isinstance(exc, DuetError):
            return gr.Error(str(exc), print_exception=False)
        if isinstance(exc, gr.Error):
            return exc
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error("something went wrong on the server; it has been logged",
                        print_exception=False)

    if _is_generator(fn):
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


def _is_generator(fn) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def add_api(service: ChatService) -> None:
    """Register the public API endpoints on the Blocks being built."""

    @user_errors
    def ask(message: str, conversation_id: str, request: gr.Request) -> dict:
        """Send a message ("" conversation_id starts a new conversation); get two replies."""
        return service.ask(user_of(request), message, conversation_id or "")

    @user_errors
    def vote(pair_id: str, choice: str, request: gr.Request) -> dict:
        """Vote on a pair: choice is one of A, B, tie, both_bad."""
        return service.vote(user_of(request), pair_id, choice)

    @user_errors
    def rate(pair_id: str, side: str, thumb: str, request: gr.Request) -> dict:
        """Thumbs up or down (thumb) on one reply (side A or B) of a pair."""
        return service.rate(user_of(request), pair_id, side, thumb)

    @user_errors
    def status() -> dict:
        """Live adapter version, vote counts, model, learner state."""
        return service.status()

    gr.api(ask, api_name="ask")
    gr.api(vote, api_name="vote")
    gr.api(rate, api_name="rate")
    gr.api(status, api_name="status")


def build_ui(service: ChatService) -> gr.Blocks:
    with gr.Blocks(title="Duet") as demo:
        conversation_id = gr.State("")
        pair_id = gr.State("")
        gr.Markdown("## Duet\nEvery message gets two replies. Pick the better one: "
                    "the model learns from your choices.")
        history = gr.Chatbot(label="Conversation", height=360)
        with gr.Row(equal_height=True):
            reply_a = gr.Textbox(label="Reply A", lines=6, interactive=False)
            reply_b = gr.Textbox(label="Reply B", lines=6, interactive=False)
        with gr.Row():
            vote_buttons = [gr.Button(CHOICE_LABELS[c], interactive=False) for c in CHOICES]
        with gr.Row():
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                 scale=5)
            send = gr.Button("Send", variant="primary", scale=1)
            new = gr.Button("New conversation", scale=1)

        def buttons(enabled: bool) -> list:
            return [gr.update(interactive=enabled) for _ in CHOICES]

        @user_errors
        def on_send(text, conv_id, chat, request: gr.Request):
            chat = list(chat or [])
            user = user_of(request)
            for update in service.ask_stream(user, text, conv_id):
                a, b = update["replies"]
                if update["done"]:
                    chat = chat + [{"role": "user", "content": text.strip()}]
                    yield (update["conversation_id"], update["pair_id"], chat, a, b, "",
                           *buttons(True))
                else:
                    yield (conv_id, "", chat, a, b, gr.update(), *buttons(False))

        def on_vote(choice):
            @user_errors
            def handler(p_id, chat, a, b, request: gr.Request):
                if not p_id:
                    raise gr.Error("there is no pair to vote on yet")
                result = service.vote(user_of(request), p_id, choice)
                chosen = b if result["continued_with"] == "B" else a
                chat = list(chat or []) + [{"role": "assistant", "content": chosen}]
                return ("", chat, "", "", *buttons(False))
            return handler

        outputs = [conversation_id, pair_id, history, reply_a, reply_b, message, *vote_buttons]
        send.click(on_send, [message, conversation_id, history], outputs, api_visibility="private")
        message.submit(on_send, [message, conversation_id, history], outputs,
                       api_visibility="private")
        for choice, button in zip(CHOICES, vote_buttons):
            button.click(on_vote(choice), [pair_id, history, reply_a, reply_b],
                         [pair_id, history, reply_a, reply_b, *vote_buttons],
                         api_visibility="private")
        new.click(lambda: ("", "", [], "", "", *buttons(False)), None,
                  [conversation_id, pair_id, history, reply_a, reply_b, *vote_buttons],
                  api_visibility="private")
        add_api(service)
    return demo
