"""build_ui(service) -> gr.Blocks: the chat page, history, learning dashboard, and the public
API (/ask /vote /rate /status).

Handlers are thin: they find out who is asking (Gradio's authenticated request, never a form
field), call ChatService, and turn DuetError into gr.Error. What a user owns lives in gr.State
or the DB; nothing here is shared between users. Every text from a user or the model is shown
as text: HTML is escaped and Markdown is not rendered, so nothing in a message can run.

Left out: editing or deleting messages, file uploads, themes.
"""

from __future__ import annotations

import html
import logging

import gradio as gr

from chatbot.service import ChatService
from chatbot.store import CHOICES
from ui import dashboard
from ui.common import LOCAL_USER, as_text, user_errors, user_of

log = logging.getLogger(__name__)

CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
# Passed to launch(): system fonts (no request to a font CDN: Duet works offline), and no
# "clear" buttons on the chat panes (clearing the display would not clear the conversation).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
CSS = """
.no-clear button[aria-label="Clear"] { display: none !important; }
"""


def chat_messages(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": as_text(m["content"])} for m in messages]


def reply_view(text: str) -> list[dict]:
    return [{"role": "assistant", "content": as_text(text)}] if text else []


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
    def status(request: gr.Request) -> dict:
        """Live adapter version, vote counts, model, learner state."""
        return service.status()

    gr.api(ask, api_name="ask")
    gr.api(vote, api_name="vote")
    gr.api(rate, api_name="rate")
    gr.api(status, api_name="status")


def build_ui(service: ChatService, admins: frozenset[str] = frozenset({LOCAL_USER})
             ) -> gr.Blocks:
    def is_admin(request: gr.Request) -> bool:
        return user_of(request) in admins

    with gr.Blocks(title="Duet") as demo:
        conversation_id = gr.State("")
        pair_id = gr.State("")
        with gr.Row():
            gr.Markdown("## Duet\nEvery message gets two replies. Pick the better one: the "
                        "model learns from your choices.")
            whoami = gr.Markdown(elem_id="whoami")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                history = gr.Chatbot(label="Conversation", height=320, render_markdown=False,
                                     elem_id="history", feedback_options=None,
                                     buttons=["copy_all"], elem_classes=["no-clear"],
                                     placeholder="Say something to start.")
                with gr.Row(equal_height=True):
                    reply_a = gr.Chatbot(label="Reply A", height=240, render_markdown=False,
                                         elem_id="reply-a", elem_classes=["no-clear"],
                                         buttons=["copy"])
                    reply_b = gr.Chatbot(label="Reply B", height=240, render_markdown=False,
                                         elem_id="reply-b", elem_classes=["no-clear"],
                                         buttons=["copy"])
                with gr.Row():
                    vote_buttons = [gr.Button(CHOICE_LABELS[c], interactive=False,
                                              elem_id=f"vote-{c}") for c in CHOICES]
                with gr.Row():
                    message = gr.Textbox(placeholder="Type a message and press Enter",
                                         show_label=False, scale=6, elem_id="message",
                                         max_length=service.config.max_message_chars + 1)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    regenerate = gr.Button("New pair for this message", interactive=False,
                                           size="sm", elem_id="regenerate")
                    new = gr.Button("New conversation", size="sm", elem_id="new")
                gr.Markdown("Thumbs up or down on a reply tell the learner about that reply "
                            "alone. On a tie or 'both are bad' the conversation goes on from "
                            "reply A.")
            with gr.Tab("History", id="history-tab") as history_tab:
                conversation_list = gr.Dropdown(label="Your conversations", choices=[],
                                                elem_id="conversation-list")
                with gr.Row():
                    open_button = gr.Button("Open", variant="primary", elem_id="open")
                    refresh = gr.Button("Refresh", elem_id="refresh-history")
            with gr.Tab("Learning", id="learning") as learning_tab:
                board = dashboard.build(service, is_admin)

        outputs = [conversation_id, pair_id, history, reply_a, reply_b, message, regenerate,
                   *vote_buttons]

        def buttons(enabled: bool) -> list:
            return [gr.update(interactive=enabled) for _ in CHOICES]

        def streamed(updates, conv_id, chat):
            """Turn a stream of pair updates into UI updates; votes open once it is done."""
            for update in updates:
                a, b = update["replies"]
                if update["done"]:
                    yield (update["conversation_id"], update["pair_id"], chat, reply_view(a),
                           reply_view(b), gr.update(), gr.update(interactive=True),
                           *buttons(True))
                else:
                    yield (conv_id, "", chat, reply_view(a), reply_view(b), gr.update(),
                           gr.update(interactive=False), *buttons(False))

        @user_errors
        def on_send(text, conv_id, chat, request: gr.Request):
            if not (text or "").strip():
                return  # an empty message does nothing
            updates = service.ask_stream(user_of(request), text, conv_id)
            first = next(updates)  # input errors surface here, before the screen changes
            chat = list(chat or []) + [{"role": "user", "content": as_text(text.strip())}]
            a, b = first["replies"]
            yield (conv_id, "", chat, reply_view(a), reply_view(b), "",
                   gr.update(interactive=False), *buttons(False))
            yield from streamed(updates, conv_id, chat)

        @user_errors
        def on_regenerate(p_id, conv_id, chat, request: gr.Request):
            if not p_id:
                raise gr.Error("there is no pair to replace yet")
            yield from streamed(service.regenerate_stream(user_of(request), p_id), conv_id, chat)

        def on_vote(choice):
            @user_errors
            def handler(p_id, chat, a, b, request: gr.Request):
                if not p_id:
                    raise gr.Error("there is no pair to vote on yet")
                result = service.vote(user_of(request), p_id, choice)
                chosen = b if result["continued_with"] == "B" else a
                chat = list(chat or []) + list(chosen or [])
                return ("", chat, [], [], gr.update(interactive=False), *buttons(False))
            return handler

        def on_like(side):
            @user_errors
            def handler(p_id, data: gr.LikeData, request: gr.Request):
                if not p_id or data.liked not in (True, False):
                    return
                service.rate(user_of(request), p_id, side, "up" if data.liked else "down")
                gr.Info(f"Noted: thumbs {'up' if data.liked else 'down'} for reply {side}.")
            return handler

        @user_errors
        def on_open(conv_id, request: gr.Request):
            if not conv_id:
                raise gr.Error("choose a conversation first")
            view = service.conversation(user_of(request), conv_id)
            pair = view["open_pair"]
            a, b = pair["replies"] if pair else ("", "")
            return (conv_id, pair["pair_id"] if pair else "", chat_messages(view["messages"]),
                    reply_view(a), reply_view(b), "", gr.update(interactive=bool(pair)),
                    *buttons(bool(pair)), gr.Tabs(selected="chat"))

        @user_errors
        def list_conversations(request: gr.Request):
            rows = service.conversations(user_of(request))
            choices = [(f"{r['title'] or '(untitled)'} · {r['updated_at'][:16].replace('T', ' ')}",
                        r["id"]) for r in rows]
            return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)

        def on_load(request: gr.Request):
            user = user_of(request)
            role = " (admin)" if is_admin(request) else ""
            return f"Signed in as **{html.escape(user)}**{role}"

        inputs = [message, conversation_id, history]
        send.click(on_send, inputs, outputs, api_visibility="private")
        message.submit(on_send, inputs, outputs, api_visibility="private")
        regenerate.click(on_regenerate, [pair_id, conversation_id, history], outputs,
                         api_visibility="private")
        for choice, button in zip(CHOICES, vote_buttons):
            button.click(on_vote(choice), [pair_id, history, reply_a, reply_b],
                         [pair_id, history, reply_a, reply_b, regenerate, *vote_buttons],
                         api_visibility="private")
        reply_a.like(on_like("A"), [pair_id], None, api_visibility="private")
        reply_b.like(on_like("B"), [pair_id], None, api_visibility="private")
        new.click(lambda: ("", "", [], [], [], "", gr.update(interactive=False), *buttons(False)),
                  None, outputs, api_visibility="private")
        for trigger in (history_tab.select, refresh.click):
            trigger(list_conversations, None, conversation_list, api_visibility="private")
        open_button.click(on_open, [conversation_list], [*outputs, tabs],
                          api_visibility="private")
        learning_tab.select(board.refresh, None, board.outputs, api_visibility="private")
        demo.load(on_load, None, whoami, api_visibility="private")
        demo.load(board.show_admin, None, board.admin_outputs, api_visibility="private")
        add_api(service)
    return demo
