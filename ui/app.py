"""build_ui(service) -> gr.Blocks: the page (a sidebar of the user's conversations, the chat,
the learning dashboard) and the public API (/ask /vote /rate /correct /status).

Handlers are thin: they find out who is asking (Gradio's authenticated request, never a form
field), call ChatService, and turn DuetError into gr.Error. What a user owns lives in gr.State
or the DB; nothing here is shared between users. Text from a user or the model is rendered as
Markdown with its HTML escaped and the result sanitised, so nothing in a message can run
(ui/common.py). The chat lives in ui/chat.py, the learning tab in ui/dashboard.py.

THEME and CSS go to `launch()`: Gradio's default theme with the system's own fonts (no
request to a font CDN: the page works offline), the sidebar's conversations as a list, and no
"clear" buttons on the chat panes (clearing the display would not clear the conversation).

A reply can be rewritten (a correction, ChatService.correct): on the page with the chat's
Edit action, through the API with /correct (and POST /v1/feedback, ui/openai_api.py).

Left out: editing the user's own messages, deleting messages, file uploads, a choice of themes
or a dark-mode switch (Gradio follows the system's setting).
"""

from __future__ import annotations

import html
import logging

import gradio as gr

from chatbot.service import ChatService
from ui import chat, dashboard
from ui.common import LOCAL_USER, bind, user_errors, user_of

log = logging.getLogger(__name__)

THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
CSS = """
.no-clear button[aria-label="Clear"] { display: none !important; }
#conversations .wrap { flex-direction: column; gap: 2px; }
#conversations label { width: 100%; justify-content: flex-start; overflow-wrap: anywhere; }
"""


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
    def correct(pair_id: str, text: str, side: str, choice: str, request: gr.Request) -> dict:
        """Rewrite the latest reply: text is your version; side (A, B or "") the reply it
        started from; choice ("" or A, B, tie, both_bad) a vote stored with it."""
        return service.correct(user_of(request), pair_id, text, side or None, choice or None)

    @user_errors
    def status(request: gr.Request) -> dict:
        """Live adapter version, vote and correction counts, model, learner state."""
        return service.status()

    gr.api(ask, api_name="ask")
    gr.api(vote, api_name="vote")
    gr.api(rate, api_name="rate")
    gr.api(correct, api_name="correct")
    gr.api(status, api_name="status")


def build_ui(service: ChatService, admins: frozenset[str] = frozenset({LOCAL_USER})
             ) -> gr.Blocks:
    def is_admin(request: gr.Request) -> bool:
        return user_of(request) in admins

    def signed_in(request: gr.Request) -> str:
        role = " (admin)" if is_admin(request) else ""
        return f"Signed in as **{html.escape(user_of(request))}**{role}"

    with gr.Blocks(title="Duet") as demo:
        with gr.Sidebar(label="Conversations", elem_id="sidebar"):
            conversations, new = chat.build_sidebar()
        with gr.Row():
            gr.Markdown("## Duet\nEvery message gets two replies. Pick the better one: the "
                        "model learns from your choices.")
            whoami = gr.Markdown(elem_id="whoami")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat"):
                page = chat.build(service, tabs, conversations, new)
            with gr.Tab("Learning", id="learning") as learning_tab:
                board = dashboard.build(service, is_admin)
        add_api(service)  # first: the endpoints keep their names
        chat.wire(page)
        dashboard.wire(board, learning_tab, demo)
        demo.load(signed_in, None, whoami, api_visibility="private")
        demo.load(bind(chat.list_conversations, page), [page.conversation_id],
                  conversations, api_visibility="private")
    return demo
