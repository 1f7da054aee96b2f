"""Generation on a vLLM server (`--engine vllm --engine-url http://HOST:PORT`): PairGenerator's
interface over vLLM's OpenAI-compatible HTTP API, and the live adapter loaded into that server.

Each turn is one streamed request to `/v1/completions`: the prompt as token ids (Duet's own
chat template and truncation, `replies.encode_prompt`, so the stored prompt is exactly what
vLLM saw, whatever template its own transformers would apply), `n=2` (1 for the API's n=1;
K under --pair-candidates K, of which two are shown),
the server's temperature and top-p with every other sampling knob off, `max_tokens` (the
request's cap, never above --max-new-tokens), `logprobs=0` (the sampled token's log-prob only)
and `return_token_ids`. Each chunk carries one choice's new token ids and log-probs, its
`index` saying which reply; the texts are decoded here from the token ids, as PairGenerator
does. When the consumer stops reading (the page or API client went away) the HTTP response is
closed, and vLLM aborts the request.

Behaviour log-probs: vLLM takes them from the raw logits, before temperature and top-p (its
default `--logprobs-mode raw_logprobs`), so each is log pi(w_t | w_<t, s) at temperature 1
under the adapter that served the request: what PairGenerator stores. Do not start vLLM with a
`processed_*` logprobs mode. The token ids include the end-of-turn token (with its log-prob)
when a reply stopped on it. tests/test_vllm_engine.py checks both against a local forward pass.

The live adapter: `VllmLiveAdapter` follows the registry like LiveAdapter and verifies each
version the same way (manifest hashes, fetched from PostgreSQL when missing, LoRA shapes) in
this front-end's adapters folder, then `POST /v1/load_lora_adapter` loads that folder under the
name `duet-v{N}-{first 8 hex digits of its manifest's sha256}`. **vLLM reads the folder itself:
it must see this front-end's adapters folder at the same absolute path** (the same host, or a
shared mount). Requests then ask for that name as their `model` (the base model's own name,
from `/v1/models`, for version 0), and the previous version is unloaded
(`/v1/unload_lora_adapter`). vLLM's unload only forgets the name, so requests in flight on it
finish with the version they started with and no request waits for a swap. The hash in the
name means a name vLLM already knows (Duet restarted; a second front-end on the same vLLM)
holds the same weights, so it is kept. A request for a name vLLM no longer knows (vLLM
restarted; another front-end unloaded it) loads the live version again and is retried once.

Errors are EngineError, one line for the user (the URL and details go to the log): vLLM
unreachable, too slow, or refusing the request. A turn that failed stores nothing; votes are
untouched. While vLLM is down the live adapter keeps trying at each registry poll.

Left out: the chat endpoint (the prompt goes as token ids), several vLLM servers behind one
front-end (runtime-loaded adapters live in one server: give each front-end its own), an API
key for vLLM, and the model's own generation_config sampling defaults (top-k, repetition
penalty), which vLLM would apply and are switched off here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx

from chatbot.config import Config
from chatbot.errors import AdapterError, EngineError
from chatbot.hotswap import LiveAdapter
from chatbot.replies import (
    PairStream,
    Reply,
    SampledPair,
    StreamingGenerator,
    decode_reply,
)
from chatbot.store import Store

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
READ_SECONDS = 180.0  # the longest wait for a chunk: a cold vLLM on a CPU takes ~50 s at first
UNREACHABLE = "the model server (vLLM) cannot be reached; try again in a moment"


class Refused(EngineError):
    """vLLM answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the model server (vLLM) refused the request: {message}")
        self.status = status
        self.message = message


class VllmServer:
    """The few calls Duet makes to one vLLM server. Every failure is an EngineError."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url,
                                 timeout=httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS))
        self._base_model: str | None = None

    def base_model(self) -> str:
        """The name vLLM serves its base model under (the model in /v1/models without a
        parent), asked once."""
        if self._base_model is None:
            with contextlib.closing(self.open("GET", "/v1/models")) as response:
                models = json.loads(self.read(response))["data"]
            self._base_model = next(m["id"] for m in models if not m.get("parent"))
        return self._base_model

    def load_adapter(self, name: str, folder: Path) -> None:
        """Load a PEFT folder under `name`; a name already loaded is kept (the name carries
        the manifest's hash). A refusal is an AdapterError: that version is not retried."""
        try:
            self.open("POST", "/v1/load_lora_adapter",
                      {"lora_name": name, "lora_path": str(folder)}).close()
        except Refused as exc:
            if exc.status == 400 and "already been loaded" in exc.message:
                return
            raise AdapterError(f"vLLM did not load {name}: {exc.message}") from None

    def unload_adapter(self, name: str) -> None:
        """Forget `name` (already gone: fine)."""
        try:
            self.open("POST", "/v1/unload_lora_adapter", {"lora_name": name}).close()
        except Refused as exc:
            if exc.status != 404:
                raise

    def open(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """Send a request; the answer's body is read as it comes, and the caller closes it."""
        try:
            response = self.http.send(self.http.build_request(method, path, json=body),
                                      stream=True)
        except httpx.HTTPError as exc:
            raise self.failed(exc) from None
        if response.status_code >= 400:
            with contextlib.closing(response):
                text = self.read(response).decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:300] or f"HTTP {response.status_code}"
            log.warning("vLLM at %s answered %s %s with %d: %s", self.url, method, path,
                        response.status_code, message)
            raise Refused(response.status_code, message)
        return response

    def read(self, response: httpx.Response) -> bytes:
        """The rest of an open answer's body."""
        try:
            return response.read()
        except httpx.HTTPError as exc:
            raise self.failed(exc) from None

    def failed(self, exc: httpx.HTTPError) -> EngineError:
        """The user's one line for a transport failure; the details go to the log."""
        log.warning("vLLM at %s: %s: %s", self.url, type(exc).__name__, exc)
        if isinstance(exc, httpx.TimeoutException):
            return EngineError(f"the model server (vLLM) did not answer within "
                               f"{READ_SECONDS:g} s; try again")
        return EngineError(UNREACHABLE)


def events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`. An error sent
    in the stream raises EngineError."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise EngineError(f"the model server (vLLM) failed while writing: {message}")
        yield event


class Choices:
    """The token ids, log-probs and finish reasons of a completion's choices as they come."""

    def __init__(self, count: int) -> None:
        self.token_ids: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[float]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count

    def add(self, choice: dict) -> None:
        """One choice of a chunk (streamed) or of the whole answer."""
        i = choice["index"]
        self.token_ids[i] += choice.get("token_ids") or []
        self.logprobs[i] += (choice.get("logprobs") or {}).get("token_logprobs") or []
        if choice.get("finish_reason"):
            self.finish[i] = choice["finish_reason"]

    def replies(self, rows: range, tokenizer, cut: bool = False) -> tuple[Reply, ...]:
        """The finished replies of these choices; `cut`: unfinished ones were stopped early."""
        replies = []
        for i in rows:
            ids, values, finish = self.token_ids[i], self.logprobs[i], self.finish[i]
            if finish is None and cut:
                finish = "length"
            if finish not in ("stop", "length"):
                raise EngineError(f"the model server (vLLM) ended a reply with finish_reason "
                                  f"{finish!r}")
            if len(values) != len(ids) or None in values:
                raise EngineError(f"the model server (vLLM) sent {len(values)} log-probs for "
                                  f"{len(ids)} tokens")
            replies.append(Reply(text=decode_reply(tokenizer, ids), token_ids=ids,
                                 token_logprobs=[float(v) for v in values],
                                 finish_reason=finish))
        return tuple(replies)


class VllmLiveAdapter(LiveAdapter):
    """The live adapter version, loaded into a vLLM server by name (see the module docstring).
    Registry polling, verification and error reporting are LiveAdapter's."""

    def __init__(self, server: VllmServer, base_model: str, store: Store,
                 adapters_dir: Path) -> None:
        super().__init__(None, base_model, store, adapters_dir)
        self.server = server
        self._serving: tuple[int, str | None] = (0, None)  # replaced whole, read whole

    def serving(self) -> tuple[int, str | None]:
        """(the live version, vLLM's name for it; None: the base model)."""
        return self._serving

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        yield self._serving[0]  # vLLM keeps an unloaded adapter's requests going: no lock

    @contextlib.contextmanager
    def base(self) -> Iterator[int]:
        yield 0  # vLLM serves the base model beside the adapter: nobody waits

    def sync(self) -> bool:
        """LiveAdapter.sync; while vLLM cannot be reached, say so and try at the next poll."""
        try:
            return super().sync()
        except EngineError as exc:
            error = f"the live adapter could not be loaded into vLLM, v{self.version} " \
                    f"keeps serving: {exc}"
            if error != self.last_error:
                log.warning("%s", error)
            self.last_error = error
            return False

    def recover(self) -> None:
        """vLLM does not know the live version's name any more: load it again."""
        with self._syncing:
            self._serving, self.version, self._failed = (0, None), 0, None
        self.sync()

    def _load(self, row: dict | None) -> None:
        old = self._serving[1]
        version, name = 0, None
        if row is not None:
            folder, _, _ = self._verified(row)  # manifest hashes, LoRA shapes, finite weights
            version, name = row["version"], adapter_name(row)
            self.server.load_adapter(name, folder.resolve())
        self._serving = (version, name)
        self.version = version
        self.swaps += 1
        log.info("vLLM now serves adapter v%d as %s", version, name or "its base model")
        if old and old != name:
            try:
                self.server.unload_adapter(old)
            except EngineError as exc:  # the new version serves anyway
                log.warning("could not unload %s from vLLM: %s", old, exc)


def adapter_name(row: dict) -> str:
    """vLLM's name for a registry row's adapter: its version and its manifest's hash."""
    return f"duet-v{row['version']}-{row['sha256'][:8]}"


class VllmGenerator(StreamingGenerator):
    """PairGenerator's interface on a vLLM server (see the module docstring): each stream is
    one vLLM request."""

    def __init__(self, server: VllmServer, live: VllmLiveAdapter, tokenizer, config: Config,
                 stop_ids: set[int]) -> None:
        self.server = server
        self.live = live
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = set(stop_ids)

    def sample_many(self, conversations: list[list[dict]], n: int = 2, base: bool = False
                    ) -> list[SampledPair]:
        """`n` replies to each conversation from one vLLM request (not streamed); `base=True`
        asks the base model. Choice `n * i + j` is reply j to conversation i."""
        prompts = [self.prompt_ids(messages) for messages in conversations]
        started = time.perf_counter()
        version, response = self._open(prompts, n, self.config.max_new_tokens, stream=False,
                                       base=base)
        with contextlib.closing(response):
            answer = json.loads(self.server.read(response))
        choices = Choices(n * len(prompts))
        for choice in answer["choices"]:
            choices.add(choice)
        seconds = time.perf_counter() - started
        return [SampledPair(
            prompt_token_ids=prompt, replies=choices.replies(range(n * i, n * i + n),
                                                             self.tokenizer),
            adapter_version=version, temperature=self.config.temperature,
            top_p=self.config.top_p, max_new_tokens=self.config.max_new_tokens,
            seconds=seconds, first_token_seconds=None) for i, prompt in enumerate(prompts)]

    def _run(self, prompt: list[int], stream: PairStream, n: int,
             max_new_tokens: int) -> Iterator[tuple[str, ...]]:
        started = time.perf_counter()
        version, response = self._open(prompt, n, max_new_tokens, stream=True)
        choices = Choices(n)
        first_token = None
        try:
            for event in events(response.iter_lines()):
                for choice in event["choices"]:
                    choices.add(choice)
                first_token = first_token or time.perf_counter() - started
                yield tuple(decode_reply(self.tokenizer, ids) for ids in choices.token_ids)
                if stream.cancel.is_set():
                    break
        except httpx.HTTPError as exc:
            raise self.server.failed(exc) from None
        finally:  # also reached when the consumer stops early: vLLM aborts the request
            stream.cancel.set()
            response.close()
        stream.result = SampledPair(
            prompt_token_ids=prompt, adapter_version=version,
            replies=choices.replies(range(n), self.tokenizer, cut=True),
            temperature=self.config.temperature, top_p=self.config.top_p,
            max_new_tokens=max_new_tokens, seconds=time.perf_counter() - started,
            first_token_seconds=first_token)

    def _open(self, prompt: list[int] | list[list[int]], n: int, max_tokens: int, *,
              stream: bool, base: bool = False) -> tuple[int, httpx.Response]:
        """(adapter version, vLLM's open answer) of one completion request. If vLLM does not
        know the adapter's name, the live version is loaded again and the request retried."""
        for retry in (False, True):
            version, name = (0, None) if base else self.live.serving()
            body = {"model": name or self.server.base_model(), "prompt": prompt, "n": n,
                    "max_tokens": max_tokens, "temperature": self.config.temperature,
                    "top_p": self.config.top_p, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": 1.0, "stop_token_ids": sorted(self.stop_ids),
                    "logprobs": 0, "return_token_ids": True, "stream": stream}
            try:
                return version, self.server.open("POST", "/v1/completions", body)
            except Refused as exc:
                if retry or name is None or exc.status != 404:
                    raise
                log.warning("vLLM does not know %s (restarted?): loading v%d again", name,
                            version)
                self.live.recover()
        raise AssertionError("unreachable")


def end_of_turn_ids(path: str, tokenizer) -> set[int]:
    """The ids that end a reply: the model's generation config's eos_token_id, as
    PairGenerator takes them from the loaded model."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the one the model's config implies
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    eos = generation.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids or {tokenizer.eos_token_id}


def connect(config: Config, store: Store) -> tuple[VllmGenerator, VllmLiveAdapter, str]:
    """The vLLM engine for --engine-url: (generator, live adapter, the model id adapter
    manifests record). Only the tokenizer is loaded here; vLLM holds the weights."""
    from chatbot.model import load_tokenizer

    tokenizer, path, model_id = load_tokenizer(config)
    server = VllmServer(config.engine_url)
    live = VllmLiveAdapter(server, model_id, store, config.adapters_dir)
    generator = VllmGenerator(server, live, tokenizer, config,
                              stop_ids=end_of_turn_ids(path, tokenizer))
    return generator, live, model_id
