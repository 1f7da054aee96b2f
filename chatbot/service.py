"""ChatService: the verbs the UI and the API call - ask, regenerate, continue, complete, vote,
correct, rate, compare with the base model, status.

It checks input, asks the generator for a pair, and stores what happened; it knows nothing
of Gradio. Identity is a user id string that the caller has already authenticated.

`complete_stream` is the OpenAI-compatible API's verb: the request carries the whole
conversation, so each call starts a new stored conversation with those messages as its
history, and samples a pair (n=2, to vote on) or a single reply (n=1, to rate).

A reply the length limit cut (finish_reason "length") says so (`cut_at`, its token count).
`continue_stream` asks the model to go on after such a reply, once it was voted on: it is a
new turn whose user message is CONTINUE_MESSAGE, so its pair is voted on and learnt from like
any other, and the model sees what it wrote so far.

Left out: moderation of content, quotas on generation (the Gradio queue bounds the page's,
`limits.Slots` the OpenAI-compatible API's).
"""

from __future__ import annotations

import logging
import shutil
import unicodedata
from collections.abc import Callable, Iterator

from chatbot import adapters
from chatbot.config import Config
from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.hotswap import LiveAdapter
from chatbot.limits import RateLimiter
from chatbot.replies import Generator, SampledPair
from chatbot.store import CHOICES, SIDES, Store  # noqa: F401 - the page's choices

log = logging.getLogger(__name__)

_ALLOWED_CONTROL = {"\n", "\r", "\t"}
CONTINUE_MESSAGE = "Continue from where you stopped."
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def clean_message(message: object, max_chars: int, what: str = "the message") -> str:
    """Return the message stripped, or raise InvalidInput saying what is wrong with it
    (`what` names it in the error: the message, the edited reply)."""
    if not isinstance(message, str):
        raise InvalidInput(f"{what} must be text")
    message = message.strip()
    if not message:
        raise InvalidInput(f"{what} is empty")
    if len(message) > max_chars:
        raise InvalidInput(f"{what} is {len(message)} characters long; at most "
                           f"{max_chars} are accepted")
    for char in message:
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidInput(f"{what} contains invalid Unicode (a lone surrogate)")
        if category == "Cc" and char not in _ALLOWED_CONTROL:
            raise InvalidInput(f"{what} contains control characters (e.g. NUL)")
    return message


def clean_messages(messages: object, max_chars: int, max_turns: int
                   ) -> tuple[list[dict], str]:
    """(history, last user message) from a whole conversation, or InvalidInput saying why not.

    Roles are system (or developer), user and assistant; the last message must be the user's.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty list")
    cleaned = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidInput(f"messages[{i}]: role must be one of {', '.join(ROLES)}; "
                               f"got {role!r}")
        try:
            content = clean_message(message.get("content"), max_chars)
        except InvalidInput as exc:
            raise InvalidInput(f"messages[{i}]: {exc}") from None
        cleaned.append({"role": ROLES[role], "content": content})
    if cleaned[-1]["role"] != "user":
        raise InvalidInput("the last message must be the user's")
    if sum(m["role"] == "user" for m in cleaned) > max_turns:
        raise InvalidInput(f"a conversation may have at most {max_turns} user messages")
    return cleaned[:-1], cleaned[-1]["content"]


def _pair_columns(pair: SampledPair) -> tuple[dict, list[dict]]:
    columns = {"prompt_token_ids": pair.prompt_token_ids, "adapter_version": pair.adapter_version,
               "temperature": pair.temperature, "top_p": pair.top_p,
               "max_new_tokens": pair.max_new_tokens, "seconds": pair.seconds,
               "first_token_seconds": pair.first_token_seconds, "candidates": pair.candidates}
    replies = [{"text": r.text, "token_ids": r.token_ids, "token_logprobs": r.token_logprobs,
                "behaviour_logprob": r.behaviour_logprob, "adapter_version": pair.adapter_version,
                "temperature": pair.temperature if r.temperature is None else r.temperature,
                "finish_reason": r.finish_reason, "n_tokens": len(r.token_ids)}
               for r in pair.replies]
    return columns, replies


def _cut_at(replies: list[dict]) -> list[int | None]:
    """Each reply's token count where the length limit cut it, else None."""
    return [r.get("n_tokens") if r.get("finish_reason") == "length" else None for r in replies]


class ChatService:
    def __init__(self, config: Config, store: Store, generator: Generator, *,
                 model_id: str, live: LiveAdapter | None = None,
                 learner_state: Callable[[], dict] | None = None) -> None:
        self.config = config
        self.store = store
        self.generator = generator
        self.model_id = model_id
        self.live = live
        self.learner_state = learner_state
        self.feedback_limit = RateLimiter(config.max_votes_per_minute, 60.0)

    # --- asking ------------------------------------------------------------------------

    def ask_stream(self, user: str, message: str, conversation_id: str = "") -> Iterator[dict]:
        """Yield the pair as it grows; the last item has `done: True` and the stored pair_id."""
        message = clean_message(message, self.config.max_message_chars)
        history = self._history(user, conversation_id)
        stream = self.generator.stream(history + [{"role": "user", "content": message}])
        for texts in stream:
            yield self._progress(conversation_id, None, list(texts), None, done=False)
        pair, replies = _pair_columns(stream.result)
        conversation_id, pair_id = self.store.add_turn(
            user, conversation_id or None, message, pair, replies)
        yield self._progress(conversation_id, pair_id, [r["text"] for r in replies],
                             stream.result.adapter_version, done=True, cut_at=_cut_at(replies))

    def check_message(self, user: str, message: str, conversation_id: str = "") -> str:
        """The message cleaned, if `ask_stream` would take it now; else the error it would
        raise (so a page can show the message before the replies come)."""
        message = clean_message(message, self.config.max_message_chars)
        self._history(user, conversation_id)
        return message

    def regenerate_stream(self, user: str, pair_id: str) -> Iterator[dict]:
        """A new pair for the same user message, replacing the open pair `pair_id`."""
        old = self.store.pair(user, pair_id)
        if old["status"] != "open":
            raise Conflict("only the latest pair, before it is voted on, can be regenerated")
        messages = self.store.messages(old["conversation_id"])
        stream = self.generator.stream([{"role": m["role"], "content": m["content"]}
                                        for m in messages])
        for texts in stream:
            yield self._progress(old["conversation_id"], None, list(texts), None, done=False)
        pair, replies = _pair_columns(stream.result)
        new_id = self.store.add_regenerated_pair(user, pair_id, pair, replies)
        yield self._progress(old["conversation_id"], new_id, [r["text"] for r in replies],
                             stream.result.adapter_version, done=True, cut_at=_cut_at(replies))

    def continue_stream(self, user: str, conversation_id: str) -> Iterator[dict]:
        """Ask the model to go on after the conversation's last reply, which the length limit
        cut and the user voted on: `ask_stream` with CONTINUE_MESSAGE."""
        if not self.conversation(user, conversation_id)["can_continue"]:
            raise Conflict("the last reply was not cut by the length limit (or still waits "
                           "for a vote): there is nothing to continue")
        yield from self.ask_stream(user, CONTINUE_MESSAGE, conversation_id)

    def ask(self, user: str, message: str, conversation_id: str = "") -> dict:
        """The API's /ask: the finished pair as one dict."""
        *_, result = self.ask_stream(user, message, conversation_id)
        assert result["done"]
        return {k: result[k] for k in ("conversation_id", "pair_id", "replies", "adapter_version")}

    def complete_stream(self, user: str, messages: list[dict], n: int = 2,
                        max_new_tokens: int | None = None, logprobs: bool = False
                        ) -> Iterator[dict]:
        """Replies to a whole conversation, stored as a new one: yields `{"texts": [...],
        "done": False}` as they grow, then the stored result with `done: True`, `pair_id`,
        `adapter_version`, `prompt_tokens` and per reply its text, finish_reason, token count
        and (with `logprobs`) each token's text and log-probability under the adapter that made
        it (temperature 1; the end-of-turn token left out).

        n=2 is a pair to vote on; n=1 a single reply, to rate. `max_new_tokens` may lower the
        server's --max-new-tokens, never raise it.
        """
        if n not in (1, 2):
            raise InvalidInput(f"n must be 1 (one reply) or 2 (a pair to vote on); got {n!r}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1; got {max_new_tokens}")
        history, message = clean_messages(messages, self.config.max_message_chars,
                                          self.config.max_turns)
        stream = self.generator.stream(history + [{"role": "user", "content": message}], n=n,
                                       max_new_tokens=max_new_tokens)
        for texts in stream:
            yield {"texts": list(texts), "done": False}
        pair, replies = _pair_columns(stream.result)
        conversation_id, pair_id = self.store.add_conversation_turn(user, history, message,
                                                                    pair, replies)
        done = []
        for reply in replies:
            item = {k: reply[k] for k in ("text", "finish_reason", "n_tokens")}
            if logprobs:
                ids, values = reply["token_ids"], reply["token_logprobs"]
                if reply["finish_reason"] == "stop":
                    ids, values = ids[:-1], values[:-1]
                item["tokens"] = list(zip(self.generator.token_texts(ids), values))
            done.append(item)
        yield {"done": True, "conversation_id": conversation_id, "pair_id": pair_id,
               "adapter_version": stream.result.adapter_version, "replies": done,
               "prompt_tokens": len(stream.result.prompt_token_ids)}

    def _history(self, user: str, conversation_id: str) -> list[dict]:
        if not conversation_id:
            return []
        self.store.conversation(user, conversation_id)  # raises NotFound for other users
        if self.store.open_pair(conversation_id):
            raise Conflict("vote on the last pair of replies before sending a new message")
        messages = self.store.messages(conversation_id)
        if sum(m["role"] == "user" for m in messages) >= self.config.max_turns:
            raise Conflict(f"this conversation has reached {self.config.max_turns} turns; "
                           "start a new one")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    @staticmethod
    def _progress(conversation_id: str, pair_id: str | None, replies: list[str],
                  adapter_version: int | None, *, done: bool,
                  cut_at: list[int | None] | None = None) -> dict:
        """One step of a streamed pair; `cut_at` (once done): each reply's token count where
        the length limit cut it, else None."""
        return {"conversation_id": conversation_id, "pair_id": pair_id, "replies": replies,
                "adapter_version": adapter_version, "done": done,
                "cut_at": cut_at or [None] * len(replies)}

    # --- feedback ----------------------------------------------------------------------

    def vote(self, user: str, pair_id: str, choice: str) -> dict:
        self.feedback_limit.check(user, "votes")
        result = self.store.record_vote(user, str(pair_id), str(choice))
        return {"ok": True, **result}

    def correct(self, user: str, pair_id: str, text: str, side: str | None = None,
                choice: str | None = None) -> dict:
        """A person's rewrite of a reply of the pair: the strongest label they can give (better
        than every reply sampled for that turn). The conversation goes on from it; `choice`, if
        given, is a vote stored with it. See Store.record_correction for the rules."""
        self.feedback_limit.check(user, "votes")
        text = clean_message(text, self.config.max_message_chars, "the edited reply")
        result = self.store.record_correction(user, str(pair_id), text,
                                              None if side in (None, "") else str(side),
                                              None if choice in (None, "") else str(choice))
        return {"ok": True, **result}

    def rate(self, user: str, pair_id: str, side: str, thumb: str) -> dict:
        self.feedback_limit.check(user, "votes")
        result = self.store.record_rating(user, str(pair_id), str(side), str(thumb))
        return {"ok": True, **result}

    # --- reading -----------------------------------------------------------------------

    def conversations(self, user: str) -> list[dict]:
        """The user's own conversations, newest first."""
        return self.store.conversations(user)

    def conversation(self, user: str, conversation_id: str) -> dict:
        """Messages so far (each with `cut_at`), the open pair awaiting a vote (or None),
        whether the last reply can be continued, and the pair the last reply answered
        (`last_pair_id`, for `correct`; None while the last message is the user's or the
        reply came with the conversation's history), for reopening."""
        self.store.conversation(user, conversation_id)
        endings = self.store.reply_endings(conversation_id)
        rows = self.store.messages(conversation_id)
        messages = [{"role": m["role"], "content": m["content"],
                     "cut_at": _cut_at([endings.get(m["id"], {})])[0]} for m in rows]
        last_pair_id = rows[-1]["pair_id"] if rows and rows[-1]["role"] == "assistant" else None
        open_pair = self.store.open_pair(conversation_id)
        pair = None
        if open_pair:
            full = self.store.pair(user, open_pair["id"])
            pair = {"pair_id": full["id"], "replies": [r["text"] for r in full["replies"]],
                    "adapter_version": full["adapter_version"],
                    "cut_at": _cut_at(full["replies"])}
        can_continue = (pair is None and bool(messages) and messages[-1]["role"] == "assistant"
                        and messages[-1]["cut_at"] is not None)
        return {"conversation_id": conversation_id, "messages": messages, "open_pair": pair,
                "can_continue": can_continue, "last_pair_id": last_pair_id}

    def compare_with_base(self, user: str, prompts: int = 3) -> dict:
        """What the feedback changed: for `prompts` of the user's prompts, one reply of the
        base model beside one of the live adapter, each sampled afresh at the server's
        settings, each with its `cut_at`. Nothing is stored.

        The prompts are first the turns whose reply the user rewrote, newest edit first (the
        conversation up to that turn's message, and the rewrite as `correction`: the reply the
        adapter was taught), then the first messages of their latest conversations
        (`correction` None). `earlier_messages` counts what came before `prompt`.
        Costs two batched generations; while the base model's replies are written the chat
        waits (the adapter is off for everyone meanwhile)."""
        version = self.live.version if self.live else self.store.live_adapter_version()
        chosen = self.store.corrected_prompts(user, prompts)
        # `prompts` first messages are enough: each corrected turn repeats at most one
        for text in self.store.recent_prompts(user, prompts):
            messages = [{"role": "user", "content": text}]
            if len(chosen) < prompts and all(c["messages"] != messages for c in chosen):
                chosen.append({"messages": messages, "correction": None})
        if not version or not chosen:
            return {"live_adapter_version": version, "rows": []}
        conversations = [c["messages"] for c in chosen]
        # not in the request's thread: chatbot/sampling.py, "Threads"
        live, base = self.generator.in_sampling_thread(lambda: (
            self.generator.sample_many(conversations, n=1),
            self.generator.sample_many(conversations, n=1, base=True)))
        rows = []
        for turn, from_live, from_base in zip(chosen, live, base):
            _, (live_reply,) = _pair_columns(from_live)
            _, (base_reply,) = _pair_columns(from_base)
            cut_base, cut_live = _cut_at([base_reply, live_reply])
            rows.append({"prompt": turn["messages"][-1]["content"],
                         "earlier_messages": len(turn["messages"]) - 1,
                         "correction": turn["correction"], "base": base_reply["text"],
                         "live": live_reply["text"], "base_cut_at": cut_base,
                         "live_cut_at": cut_live})
        return {"live_adapter_version": live[0].adapter_version, "rows": rows}

    def dashboard(self) -> dict:
        """Everything the learning tab shows: status, learner steps, adapter versions."""
        return {"status": self.status(), "steps": self.store.learner_steps(),
                "adapters": self.store.adapters()}

    def rollback(self, to: int | None = None) -> dict:
        return rollback(self.store, self.config, to)

    def status(self) -> dict:
        counts = self.store.pending_counts()
        registry_version = self.store.live_adapter_version()
        return {
            "live_adapter_version": self.live.version if self.live else registry_version,
            "registry_live_version": registry_version,
            **counts,
            "model": self.model_id,
            "swap_error": self.live.last_error if self.live else None,
            "learner": self.learner_state() if self.learner_state else {"state": "not started"},
        }


def rollback(store: Store, config: Config, to: int | None = None) -> dict:
    """Make an earlier adapter version live (default: the version the live one's round started
    from, its parent or its preview's parent: the round is undone whole; 0 = base).

    The target's files are checked against its manifest first, so a rollback never points
    the server at an adapter it would refuse to load.
    """
    live = store.live_adapter()
    before = live["version"] if live else 0
    if to is None:
        if live is None:
            raise Conflict("the base model (v0) is live; there is nothing to roll back")
        to = store.round_origin(live["version"])
    check_on_disk(store, config, to)
    store.set_live(to)
    return {"ok": True, "live_adapter_version": to, "previous_version": before}


def check_on_disk(store: Store, config: Config, version: int) -> None:
    """Raise unless `version` (0: the base model) can be made live: registered, its folder
    kept, its files matching its manifest (fetched from the database where they travel)."""
    if not version:
        return
    row = store.adapter(version)
    if row is None:
        raise NotFound(f"no adapter version {version}")
    if not row["path"]:
        raise Conflict(f"v{version} was deleted from disk (only the last "
                       f"{config.keep_versions} versions are kept, and none trained on a "
                       "forgotten user's feedback)")
    adapters.verified_copy(config.adapters_dir, row, base_model=row["base_model"],
                           fetch=store.adapter_files)


def forget_user(store: Store, config: Config, user_id: str, relearn: bool = False) -> dict:
    """Delete every row of a user (Store.forget_user). With `relearn`, also undo what the
    adapters learnt from them: the version their feedback's first round started from goes
    live, every later version's folder is deleted, and the other users' feedback those
    versions used is learnt again. Returns Store.forget_user's summary."""
    origin = None
    if relearn:
        trained = store.trained_on(user_id)
        if trained:
            origin = store.round_origin(trained[0])
            check_on_disk(store, config, origin)
    result = store.forget_user(user_id, relearn_from=origin)
    for path in result["removed"]:
        shutil.rmtree(config.adapters_dir / path, ignore_errors=True)
    return result
