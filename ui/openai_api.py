"""The OpenAI-compatible API, served by the page's own server: GET /v1/models,
POST /v1/chat/completions (streamed or not) and POST /v1/feedback.

`openai_routes(service, logins)` returns FastAPI routes that `app.py` hands to Gradio's launch,
so they run in the same process over the same ChatService verbs as the page. The handlers
have the page's shape (ui/chat.py): module-level functions of the state they share (`Api`)
and the request. They are thin: they find out who is asking, parse the request, call the
service, and shape the answer (or the error) the way OpenAI's API does.

* Identity: with logins on, `Authorization: Bearer <key>` with a key made by
  `python app.py keys add USER` (anything else: 401); without logins every request is the
  single local user, whatever token it carries. Never from the body.
* `n=2` samples a stored pair: choices[0] is reply A and choices[1] reply B; `n=1` (OpenAI's
  default) one stored reply. Every response and every streamed chunk carries `pair_id` and
  `adapter_version` beside the usual fields; in a stream they are null until the last chunk
  of the replies (the one with `finish_reason`), because the pair is stored once it is
  complete. Per-token `logprobs` (when asked for) also come in that last chunk. A client that
  leaves a stream early stops its generation, and nothing is stored (as on the page).
* POST /v1/feedback, with exactly the rules of the page's /vote, /rate and /correct:
  `{"pair_id", "choice"}` is a vote, `{"pair_id", "side", "thumb"}` a rating, and
  `{"pair_id", "correction"}` a correction: the person's rewrite of the latest reply
  (optionally `side`, the reply it started from, and `choice`, a vote stored with it in one
  transaction). On an open pair the rewrite is the turn's feedback; after a vote it replaces
  the reply the conversation went on from; sent again it replaces the earlier rewrite until
  the learner has taken it (then 409). A thumb with a correction is a 400 (a rating is its
  own request). The answer's `kind` says which it was ("vote", "rating", "correction"); a
  correction with a choice carries the vote's `vote_id` and `choice` too.
* Errors: `{"error": {"message", "type", "param", "code"}}` with 400 (bad input, e.g. an
  empty correction), 401, 404 (no such pair for this user), 409 (e.g. a second vote; sent with
  `x-should-retry: false` so the openai client does not retry it), 429 (the rate limit that
  votes, ratings and corrections share; a full queue), 500 (no details).
* Generation is bounded like the page's queue: --concurrency replies at once, --queue-size
  waiting, then 429.

Left out: tools and function calling, response_format, stop sequences, top_logprobs (always an
empty list), a request's temperature / top_p / seed (every reply is sampled with the server's
settings, the behaviour policy the learner corrects for), /v1/completions and embeddings.
Any `model` name is accepted: the live adapter answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError

from chatbot import api_keys
from chatbot.errors import Conflict, DuetError, EngineError, InvalidInput, NotFound, TooBusy
from chatbot.limits import Slots
from chatbot.service import ChatService
from ui.common import LOCAL_USER

log = logging.getLogger(__name__)

MODEL_NAME = "duet"


# --- request bodies --------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content}


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    model: str = MODEL_NAME
    messages: list[Message]
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class FeedbackRequest(_Body):
    pair_id: str
    choice: str | None = None
    side: str | None = None
    thumb: str | None = None
    correction: str | None = None


# --- errors ----------------------------------------------------------------------------

class Unauthorized(Exception):
    pass


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (400, 401, 404, 409):
        headers["x-should-retry"] = "false"
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) for an exception; unexpected ones are logged."""
    if isinstance(exc, Unauthorized):
        return 401, {"message": "a valid API key is needed: send 'Authorization: Bearer "
                                "<key>' with a key made by `python app.py keys add USER`",
                     "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        return 400, {"message": f"{param or 'body'}: {first['msg']}",
                     "type": "invalid_request_error", "param": param, "code": None}
    if isinstance(exc, json.JSONDecodeError):
        return 400, {"message": "the body is not valid JSON", "type": "invalid_request_error",
                     "param": None, "code": None}
    table = [(InvalidInput, 400, "invalid_request_error", None),
             (NotFound, 404, "invalid_request_error", "not_found"),
             (TooBusy, 429, "rate_limit_error", "rate_limit_exceeded"),
             (Conflict, 409, "invalid_request_error", "conflict"),
             (EngineError, 503, "server_error", "engine_unavailable"),
             (DuetError, 500, "server_error", None)]
    for kind, status, type_, code in table:
        if isinstance(exc, kind):
            return status, {"message": str(exc), "type": type_, "param": None, "code": code}
    log.error("unexpected error in the OpenAI-compatible API", exc_info=exc)
    return 500, {"message": "something went wrong on the server; it has been logged",
                 "type": "server_error", "param": None, "code": None}


def from_exception(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    return error_response(status, body["message"], body["type"], body["code"], body["param"])


# --- response pieces -------------------------------------------------------------------

def _logprobs(reply: dict) -> dict | None:
    """OpenAI's logprobs object. A token that holds only part of a UTF-8 character decodes to
    U+FFFD; its `bytes` are null rather than the bytes of that stand-in."""
    if "tokens" not in reply:
        return None
    return {"content": [{"token": text, "logprob": value,
                         "bytes": None if "\ufffd" in text else list(text.encode("utf-8")),
                         "top_logprobs": []} for text, value in reply["tokens"]]}


def _usage(result: dict) -> dict:
    completion = sum(r["n_tokens"] for r in result["replies"])
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": result["prompt_tokens"] + completion}


def _grown(sent: str, text: str) -> str:
    """What `text` adds to what was already sent, holding back a trailing partial character
    (the decoder shows half a UTF-8 sequence as U+FFFD until the rest arrives)."""
    stable = text.rstrip("\ufffd")
    return stable[len(sent):] if stable.startswith(sent) else ""


def _rest(sent: str, final: str) -> str:
    if not final.startswith(sent):  # the streamed text can only grow: nothing to take back
        log.warning("a streamed reply's final text does not continue what was sent")
        return ""
    return final[len(sent):]


class _Chunks:
    """Builds the chunk objects of one streamed completion."""

    def __init__(self) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def make(self, choices: list[dict], pair_id: str | None = None,
             adapter_version: int | None = None, usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": MODEL_NAME, "choices": choices, "pair_id": pair_id,
                 "adapter_version": adapter_version}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events from a generator that is closed when the response ends, however it
    ends: Starlette leaves an iterator suspended when the client goes away, and the generation
    slot and the sampler would then wait for the garbage collector."""

    def __init__(self, events: Iterator[str | None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self.events.close)


def _delta(index: int, delta: dict, finish_reason: str | None = None,
           logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


# --- routes ----------------------------------------------------------------------------

@dataclass
class Api:
    """What the handlers share: the service, whether requests need a key, the generation slots
    (--concurrency at once, --queue-size waiting) and when the server started."""
    service: ChatService
    logins: bool
    slots: Slots
    started: int


def openai_routes(service: ChatService, logins: bool) -> list[APIRoute]:
    """The /v1 routes over `service`; `logins`: whether requests need an API key."""
    api = Api(service, logins, Slots(service.config.concurrency, service.config.queue_size),
              int(time.time()))
    router = APIRouter(prefix="/v1")
    for path, method, handler in (("/models", "GET", models),
                                  ("/chat/completions", "POST", chat_completions),
                                  ("/feedback", "POST", feedback)):
        router.add_api_route(path, _endpoint(handler, api), methods=[method],
                             name=handler.__name__)
    return [route for route in router.routes if isinstance(route, APIRoute)]


def _endpoint(handler, api: Api):
    """`handler(api, request)` as FastAPI calls an endpoint: with the request alone."""
    async def endpoint(request: Request):
        return await handler(api, request)

    endpoint.__doc__ = handler.__doc__
    return endpoint


# --- handlers: functions of the API's state and the request -------------------------------

def caller(api: Api, request: Request) -> str:
    """Who is asking: the key's user with logins on (else 401), the local user without."""
    if not api.logins:
        return LOCAL_USER
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    user = api_keys.user_of_key(api.service.store, key.strip()) \
        if scheme.lower() == "bearer" else None
    if user is None:
        raise Unauthorized
    return user


async def models(api: Api, request: Request) -> JSONResponse:
    """The one model served: the base model with the live adapter."""
    try:
        await run_in_threadpool(caller, api, request)  # a DB look-up: off the event loop
        status = await run_in_threadpool(api.service.status)
    except Exception as exc:  # noqa: BLE001 - turned into an error response
        return from_exception(exc)
    card = {"id": MODEL_NAME, "object": "model", "created": api.started, "owned_by": "duet",
            "base_model": status["model"], "adapter_version": status["live_adapter_version"]}
    return JSONResponse({"object": "list", "data": [card]})


async def chat_completions(api: Api, request: Request):
    """A pair (n=2) or one reply (n=1), streamed or not."""
    try:
        user = await run_in_threadpool(caller, api, request)
        body = CompletionRequest.model_validate(await request.json())
        limit = (body.max_tokens if body.max_completion_tokens is None
                 else body.max_completion_tokens)
        ask = {"user": user, "messages": [m.as_dict() for m in body.messages], "n": body.n,
               "max_new_tokens": limit, "logprobs": body.logprobs}
        if not body.stream:
            return JSONResponse(await run_in_threadpool(complete, api, ask))
        usage = bool(body.stream_options and body.stream_options.include_usage)
        events = stream(api, ask, usage)
        await run_in_threadpool(next, events)  # input errors surface here, as HTTP errors
    except Exception as exc:  # noqa: BLE001
        return from_exception(exc)
    return EventStream(events)


def complete(api: Api, ask: dict) -> dict:
    with api.slots.taken():
        *_, result = api.service.complete_stream(**ask)
    choices = [{"index": i, "message": {"role": "assistant", "content": reply["text"]},
                "logprobs": _logprobs(reply), "finish_reason": reply["finish_reason"]}
               for i, reply in enumerate(result["replies"])]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": MODEL_NAME, "choices": choices,
            "usage": _usage(result), "pair_id": result["pair_id"],
            "adapter_version": result["adapter_version"]}


def stream(api: Api, ask: dict, include_usage: bool) -> Iterator[str | None]:
    """First yields None once the request is accepted, then the server-sent events."""
    with api.slots.taken(), contextlib.closing(api.service.complete_stream(**ask)) as updates:
        update = next(updates)  # a client gone mid-stream closes this: generation stops
        yield None
        chunks = _Chunks()
        sent = [""] * ask["n"]
        yield chunks.make([_delta(i, {"role": "assistant", "content": ""})
                           for i in range(ask["n"])])
        try:
            while not update["done"]:
                grown = [(i, _grown(sent[i], text)) for i, text in enumerate(update["texts"])]
                grown = [(i, text) for i, text in grown if text]
                for i, text in grown:
                    sent[i] += text
                if grown:
                    yield chunks.make([_delta(i, {"content": text}) for i, text in grown])
                update = next(updates)
        except Exception as exc:  # noqa: BLE001 - the status line has gone: say it in-band
            yield f"data: {json.dumps({'error': error_body(exc)[1]})}\n\n"
            return
    result = update
    rest = [(i, _rest(sent[i], r["text"])) for i, r in enumerate(result["replies"])]
    if any(text for _, text in rest):
        yield chunks.make([_delta(i, {"content": text}) for i, text in rest if text])
    yield chunks.make([_delta(i, {}, r["finish_reason"], _logprobs(r))
                       for i, r in enumerate(result["replies"])],
                      result["pair_id"], result["adapter_version"])
    if include_usage:
        yield chunks.make([], result["pair_id"], result["adapter_version"], _usage(result))
    yield "data: [DONE]\n\n"


async def feedback(api: Api, request: Request) -> JSONResponse:
    """A vote ({pair_id, choice}), a rating ({pair_id, side, thumb}) or a correction
    ({pair_id, correction}, with side and choice if given)."""
    service = api.service
    try:
        user = await run_in_threadpool(caller, api, request)
        body = FeedbackRequest.model_validate(await request.json())
        if body.correction is not None:
            if body.thumb is not None:
                raise InvalidInput("a correction cannot come with a thumb: send the rating "
                                   "({pair_id, side, thumb}) as its own request")
            result = await run_in_threadpool(service.correct, user, body.pair_id,
                                             body.correction, body.side, body.choice)
            kind = "correction"
        elif body.choice is not None and (body.side, body.thumb) == (None, None):
            result = await run_in_threadpool(service.vote, user, body.pair_id, body.choice)
            kind = "vote"
        elif body.choice is None and None not in (body.side, body.thumb):
            result = await run_in_threadpool(service.rate, user, body.pair_id, body.side,
                                             body.thumb)
            kind = "rating"
        else:
            raise InvalidInput("send either choice (a vote on a pair), side and thumb (a "
                               "rating of one reply), or correction (your rewrite of the "
                               "reply, with side and choice if you like)")
    except Exception as exc:  # noqa: BLE001
        return from_exception(exc)
    return JSONResponse({"object": "feedback", "kind": kind, **result})
