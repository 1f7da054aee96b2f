"""The chat: the sidebar of the user's conversations, the conversation, the two replies of a
turn, the votes, the edits, and the handlers behind them.

`build_sidebar()` and `build(...)` lay the components out, and `Page` holds them; the
handlers are functions of the page and the event's inputs that return a dict keyed by the
components they change, so a handler names what it updates and leaves the rest alone.
`wire(page)` binds them to the events.

Sending shows the user's message at once, then streams the pair (`.submit(show).success(
answer)`). A reply the length limit cut ends with a mark saying so; once it is voted on,
"Continue" asks the model to go on (ChatService.continue_stream). Replies render as Markdown
with no HTML (ui/common.py).

"Edit" opens an editor on a reply, prefilled with its text, beside a live preview rendered as
the replies are; "Save edit" stores the rewrite (ChatService.correct) and shows the
conversation as stored, going on from it. On a pair still open, the edit is the turn's answer
(no vote follows); after the vote, "Edit the last reply" rewrites the reply the conversation
went on from. Voting, sending or opening another conversation closes the editor.

Left out: renaming or deleting conversations, searching them, editing a sent message or any
reply but the latest (the store's rule: later turns were written after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from chatbot.service import CHOICES, CONTINUE_MESSAGE, SIDES, ChatService
from ui.common import as_markdown, bind, chatbot, reply_markdown, user_errors, user_of

CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
# Which reply an edit starts from: a side of the open pair, or "" for the conversation's last
# reply (ChatService.correct takes "" as a side not given).
EDIT_LABELS = {"A": "Edit reply A", "B": "Edit reply B", "": "Edit the last reply"}
TITLE_CHARS = 40  # of a conversation's title in the sidebar


@dataclass
class Page:
    service: ChatService
    tabs: gr.Tabs
    conversation_id: gr.State
    pair_id: gr.State
    pending: gr.State  # the message shown and waiting for its replies
    conversations: gr.Radio
    new: gr.Button
    history: gr.Chatbot
    reply_a: gr.Chatbot
    reply_b: gr.Chatbot
    votes: dict[str, gr.Button]
    message: gr.Textbox
    send: gr.Button
    regenerate: gr.Button
    carry_on: gr.Button  # "Continue"
    edits: dict[str, gr.Button]  # keyed as EDIT_LABELS
    editor: gr.Column  # shown while a reply is edited
    edit_pair: gr.State  # the pair whose reply is edited ("" when the editor is closed)
    edit_side: gr.State  # the side it started from, "" for the last reply
    edit_text: gr.Textbox
    edit_preview: gr.Chatbot
    save_edit: gr.Button
    cancel_edit: gr.Button

    @property
    def outputs(self) -> list:
        """Every component a chat handler may change."""
        return [self.tabs, self.conversation_id, self.pair_id, self.pending, self.history,
                self.reply_a, self.reply_b, *self.votes.values(), self.message, self.regenerate,
                self.carry_on, *self.edits.values(), self.editor, self.edit_pair,
                self.edit_side, self.edit_text, self.edit_preview]


def build_sidebar() -> tuple[gr.Radio, gr.Button]:
    """The sidebar's content: a new-conversation button and the user's conversations."""
    new = gr.Button("New conversation", variant="primary", size="sm", elem_id="new")
    conversations = gr.Radio(label="Your conversations", choices=[], elem_id="conversations",
                             info="Newest first")
    return conversations, new


def build(service: ChatService, tabs: gr.Tabs, conversations: gr.Radio, new: gr.Button
          ) -> Page:
    """The chat tab's components (inside the tab being built)."""
    history = chatbot("Conversation", "history", 160, 560, feedback_options=None,
                      buttons=["copy_all"], placeholder="Say something to start.")
    with gr.Row(equal_height=True):
        reply_a = chatbot("Reply A", "reply-a", 140, 480, buttons=["copy"])
        reply_b = chatbot("Reply B", "reply-b", 140, 480, buttons=["copy"])
    with gr.Row():
        edits = {side: gr.Button(EDIT_LABELS[side], interactive=False, size="sm",
                                 elem_id=f"edit-{side.lower()}") for side in SIDES}
    with gr.Column(visible=False, elem_id="editor") as editor:
        with gr.Row(equal_height=True):
            edit_text = gr.Textbox(label="Your version", lines=6, max_lines=20,
                                   elem_id="edit-text",
                                   max_length=service.config.max_message_chars + 1)
            edit_preview = chatbot("Preview", "edit-preview", 140, 480, buttons=[])
        with gr.Row():
            save_edit = gr.Button("Save edit", variant="primary", size="sm", elem_id="save-edit")
            cancel_edit = gr.Button("Cancel", size="sm", elem_id="cancel-edit")
    with gr.Row():
        votes = {c: gr.Button(CHOICE_LABELS[c], interactive=False, elem_id=f"vote-{c}")
                 for c in CHOICES}
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             scale=6, elem_id="message",
                             max_length=service.config.max_message_chars + 1)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    with gr.Row():
        carry_on = gr.Button("Continue the cut reply", visible=False, size="sm",
                             elem_id="continue")
        regenerate = gr.Button("New pair for this message", interactive=False, size="sm",
                               elem_id="regenerate")
        edits[""] = gr.Button(EDIT_LABELS[""], visible=False, size="sm", elem_id="edit-last")
    gr.Markdown("Thumbs up or down on a reply tell the learner about that reply alone. On a "
                "tie or 'both are bad' the conversation goes on from reply A. A reply cut by "
                "the length limit says so; after your vote, *Continue* asks for more. *Edit* "
                "rewrites a reply in your own words, the clearest lesson for the learner: "
                "before a vote your edit answers the turn (no vote follows); after it, *Edit "
                "the last reply* changes the reply the conversation went on from.")
    return Page(service=service, tabs=tabs, conversation_id=gr.State(""), pair_id=gr.State(""),
                pending=gr.State(""), conversations=conversations, new=new, history=history,
                reply_a=reply_a, reply_b=reply_b, votes=votes, message=message, send=send,
                regenerate=regenerate, carry_on=carry_on, edits=edits, editor=editor,
                edit_pair=gr.State(""), edit_side=gr.State(""), edit_text=edit_text,
                edit_preview=edit_preview, save_edit=save_edit, cancel_edit=cancel_edit)


# --- what the components show -----------------------------------------------------------

def chat_messages(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": reply_markdown(m["content"], m.get("cut_at"))}
            for m in messages]


def reply_view(text: str, cut_at: int | None = None) -> list[dict]:
    return [{"role": "assistant", "content": reply_markdown(text, cut_at)}] if text else []


def _turn(page: Page, votable: bool, last_editable: bool = False) -> dict:
    """Votes, "New pair" and the edits of A and B open while a finished pair waits for its
    vote; "Edit the last reply" shows once a reply ended the turn. The editor closes."""
    buttons = [*page.votes.values(), page.regenerate, *(page.edits[s] for s in SIDES)]
    return {**{b: gr.Button(interactive=votable) for b in buttons},
            page.edits[""]: gr.Button(visible=last_editable), **_editor_closed(page)}


def _editor_closed(page: Page) -> dict:
    return {page.editor: gr.Column(visible=False), page.edit_pair: "", page.edit_side: ""}


def _view(page: Page, view: dict) -> dict:
    """The whole chat for a conversation as ChatService.conversation gives it."""
    pair = view["open_pair"]
    a, b = pair["replies"] if pair else ("", "")
    cut_a, cut_b = pair["cut_at"] if pair else (None, None)
    return {page.conversation_id: view["conversation_id"],
            page.pair_id: pair["pair_id"] if pair else "", page.pending: "",
            page.history: chat_messages(view["messages"]),
            page.reply_a: reply_view(a, cut_a), page.reply_b: reply_view(b, cut_b),
            page.carry_on: gr.Button(visible=view["can_continue"]),
            **_turn(page, bool(pair), last_editable=not pair and bool(view["last_pair_id"]))}


def _title(row: dict) -> str:
    title = " ".join((row["title"] or "(untitled)").split())
    return title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…"


# --- handlers ---------------------------------------------------------------------------

@user_errors
def show_message(page: Page, text: str, conv_id: str, chat: list, request: gr.Request) -> dict:
    """Show the user's message at once, if it would be accepted; an empty one does nothing."""
    if not (text or "").strip():
        return {page.pending: ""}
    text = page.service.check_message(user_of(request), text, conv_id)
    return {page.history: [*(chat or []), {"role": "user", "content": as_markdown(text)}],
            page.message: "", page.pending: text, page.carry_on: gr.Button(visible=False),
            **_turn(page, False)}


@user_errors
def show_continue(page: Page, conv_id: str, chat: list, request: gr.Request) -> dict:
    if not page.service.conversation(user_of(request), conv_id)["can_continue"]:
        raise gr.Error("the last reply was not cut: there is nothing to continue")
    return {page.history: [*(chat or []),
                           {"role": "user", "content": as_markdown(CONTINUE_MESSAGE)}],
            page.pending: CONTINUE_MESSAGE, page.carry_on: gr.Button(visible=False)}


def _streamed(page: Page, updates, chat: list, shown: bool = True):
    """A stream of pair updates as chat updates; the pair opens to votes once it is done.
    If it fails, the message `shown` for it (the last in `chat`) goes away again."""
    try:
        for update in updates:
            a, b = update["replies"]
            if not update["done"]:
                yield {page.reply_a: reply_view(a), page.reply_b: reply_view(b)}
                continue
            cut_a, cut_b = update["cut_at"]
            yield {page.conversation_id: update["conversation_id"],
                   page.pair_id: update["pair_id"], page.pending: "",
                   page.reply_a: reply_view(a, cut_a), page.reply_b: reply_view(b, cut_b),
                   **_turn(page, True)}
    except Exception:
        if shown:
            yield {page.history: chat[:-1], page.pending: "", page.reply_a: [],
                   page.reply_b: []}
        raise


@user_errors
def answer(page: Page, pending: str, conv_id: str, chat: list, request: gr.Request):
    """Stream the pair of replies to the message `show_message` put up."""
    if not pending:
        yield gr.skip()
        return
    yield from _streamed(page, page.service.ask_stream(user_of(request), pending, conv_id), chat)


@user_errors
def answer_continue(page: Page, pending: str, conv_id: str, chat: list, request: gr.Request):
    if not pending:
        yield gr.skip()
        return
    yield from _streamed(page, page.service.continue_stream(user_of(request), conv_id), chat)


@user_errors
def regenerate_pair(page: Page, p_id: str, conv_id: str, chat: list, request: gr.Request):
    if not p_id:
        raise gr.Error("there is no pair to replace yet")
    yield from _streamed(page, page.service.regenerate_stream(user_of(request), p_id), chat,
                         shown=False)


@user_errors
def vote_on_pair(page: Page, choice: str, p_id: str, conv_id: str, request: gr.Request) -> dict:
    """The conversation goes on from the chosen reply (the store's rule), shown as stored."""
    if not p_id:
        raise gr.Error("there is no pair to vote on yet")
    user = user_of(request)
    page.service.vote(user, p_id, choice)
    return _view(page, page.service.conversation(user, conv_id))


@user_errors
def rate_reply(page: Page, side: str, p_id: str, data: gr.LikeData, request: gr.Request) -> None:
    if not p_id or data.liked not in (True, False):
        return
    page.service.rate(user_of(request), p_id, side, "up" if data.liked else "down")
    gr.Info(f"Noted: thumbs {'up' if data.liked else 'down'} for reply {side}.")


@user_errors
def open_editor(page: Page, side: str, conv_id: str, request: gr.Request) -> dict:
    """The editor on reply `side` of the open pair, or ("") on the conversation's last reply,
    prefilled with the reply's text as stored."""
    view = page.service.conversation(user_of(request), conv_id) if conv_id else None
    pair = view["open_pair"] if view else None
    if side and pair:
        pair_id, text = pair["pair_id"], pair["replies"][SIDES.index(side)]
    elif not side and view and not pair and view["last_pair_id"]:
        pair_id, text = view["last_pair_id"], view["messages"][-1]["content"]
    else:
        raise gr.Error("there is no reply to edit yet")
    label = f"Your version of reply {side}" if side else "Your version of the last reply"
    return {page.editor: gr.Column(visible=True), page.edit_pair: pair_id,
            page.edit_side: side, page.edit_text: gr.Textbox(value=text, label=label),
            page.edit_preview: reply_view(text)}


def preview_edit(page: Page, text: str) -> dict:
    """The edit as it will be shown (and stored: without the blanks at its ends)."""
    return {page.edit_preview: reply_view((text or "").strip())}


@user_errors
def save_edit(page: Page, e_pair: str, side: str, text: str, request: gr.Request) -> None:
    """Store the edit; `open_conversation` then shows the conversation going on from it. No
    outputs: a refused edit is a message alone, and the page stays as it was."""
    if not e_pair:
        raise gr.Error("there is no reply being edited")
    page.service.correct(user_of(request), e_pair, text, side=side)


def cancel_edit(page: Page) -> dict:
    return _editor_closed(page)


@user_errors
def open_conversation(page: Page, conv_id: str, request: gr.Request) -> dict:
    """The conversation as stored, in the chat tab."""
    if not conv_id:
        return gr.skip()
    view = page.service.conversation(user_of(request), conv_id)
    return {**_view(page, view), page.tabs: gr.Tabs(selected="chat")}


def new_conversation(page: Page) -> dict:
    return {page.conversation_id: "", page.pair_id: "", page.pending: "", page.history: [],
            page.reply_a: [], page.reply_b: [], page.carry_on: gr.Button(visible=False),
            page.conversations: None,
            page.tabs: gr.Tabs(selected="chat"), **_turn(page, False)}


@user_errors
def list_conversations(page: Page, conv_id: str, request: gr.Request) -> gr.Radio:
    """The user's conversations, most recently active first, the open one selected."""
    rows = page.service.conversations(user_of(request))
    return gr.Radio(choices=[(_title(r), r["id"]) for r in rows], value=conv_id or None)


def wire(page: Page) -> None:
    """Bind the handlers to the page's events. None is part of the public API, and none is
    named after one of its endpoints (a private event still takes its function's name)."""
    private = {"api_visibility": "private"}
    outputs = page.outputs
    sidebar = (bind(list_conversations, page), [page.conversation_id], page.conversations)
    typed = [page.message, page.conversation_id, page.history]
    streamed = [page.pending, page.conversation_id, page.history]
    for trigger in (page.message.submit, page.send.click):
        (trigger(bind(show_message, page), typed, outputs, **private)
         .success(bind(answer, page), streamed, outputs, **private)
         .then(*sidebar, **private))
    (page.carry_on.click(bind(show_continue, page), [page.conversation_id, page.history],
                         outputs, **private)
     .success(bind(answer_continue, page), streamed, outputs, **private)
     .then(*sidebar, **private))
    page.regenerate.click(bind(regenerate_pair, page),
                          [page.pair_id, page.conversation_id, page.history], outputs, **private)
    for choice, button in page.votes.items():
        button.click(bind(vote_on_pair, page, choice), [page.pair_id, page.conversation_id],
                     outputs, **private).then(*sidebar, **private)
    for side, button in page.edits.items():
        button.click(bind(open_editor, page, side), [page.conversation_id], outputs, **private)
    # .change, not .input: Gradio's textbox reports input on keypresses only, not on a paste
    page.edit_text.change(bind(preview_edit, page), [page.edit_text], [page.edit_preview],
                          show_progress="hidden", **private)
    (page.save_edit.click(bind(save_edit, page), [page.edit_pair, page.edit_side,
                                                  page.edit_text], None, **private)
     .success(bind(open_conversation, page), [page.conversation_id], outputs, **private)
     .then(*sidebar, **private))
    page.cancel_edit.click(bind(cancel_edit, page), None, outputs, **private)
    page.reply_a.like(bind(rate_reply, page, "A"), [page.pair_id], None, **private)
    page.reply_b.like(bind(rate_reply, page, "B"), [page.pair_id], None, **private)
    page.new.click(bind(new_conversation, page), None, [*outputs, page.conversations],
                   **private)
    page.conversations.input(bind(open_conversation, page), [page.conversations], outputs,
                             **private)
