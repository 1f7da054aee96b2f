"""Keep the server's model on the live adapter version, swapping between requests.

Generation holds a read lock for a whole pair, so any number of pairs run at once on the same
version; a swap takes the write lock, which waits for the pairs in flight to finish (each
finishes on the version it started with) and holds new ones back while it lasts.

One adapter slot stays loaded. A new version is read, verified against its manifest
and parsed outside the lock; under the lock its tensors are only copied into the slot's
parameters, which takes milliseconds (PEFT's load_adapter, which builds new LoRA layers, held
the lock ~450 ms at r=8 on the 135M model). Only the first version, or one of another shape
(rank, alpha, target modules), rebuilds the slot. Memory stays flat however many versions go
by. Version 0 is the base model: the slot is switched off, not unloaded.

`base()` lends the model out with the adapter switched off, for the base model's own replies
(the Learning tab's "what changed" view). The switch is the model's one global setting, so it
takes the write lock: replies in flight finish first, and new ones wait until it is done.

A version that fails verification is never loaded: the current one keeps serving, and the
reason is kept in `last_error` (shown by /status) until a later version loads. With PostgreSQL
a version missing from this server's adapters folder is fetched from the database first
(`adapters.verified_copy`), so front-ends on other hosts need no shared folder.

Left out: serving several versions at once (PEFT's mixed-adapter batches would allow it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from chatbot import adapters
from chatbot.errors import AdapterError
from chatbot.store import Store
from chatbot.threads import in_fresh_thread_on_cpu

log = logging.getLogger(__name__)

SLOTS = ("live", "live-b")  # the resident adapter's name; a rebuild loads under the other
# A rebuilt slot briefly sits beside the old one (the new one loads before the old one goes).
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
# adapter_config.json fields that change the slot's layers or scaling: any difference rebuilds.
SHAPE_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern",
                "alpha_pattern", "modules_to_save", "bias")


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class LiveAdapter:
    """The adapter version the server generates with, following the DB registry."""

    def __init__(self, model, base_model: str, store: Store, adapters_dir: Path) -> None:
        self.model = model
        self.base_model = base_model
        self.store = store
        self.adapters_dir = Path(adapters_dir)
        self.version = 0
        self.last_error: str | None = None
        self.swaps = 0
        self.last_blocking_ms: float | None = None  # write lock held by the last swap
        self._slot: str | None = None  # the resident adapter's name, once built
        self._slot_config: dict | None = None  # the config it was built with
        self._lock = RWLock()
        self._syncing = threading.Lock()  # one sync at a time (poll thread, tests, benches)
        self._failed: tuple[int, str] | None = None  # (version, manifest sha) not to retry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the current version in place; yields its number."""
        with self._lock.read():
            yield self.version

    @contextlib.contextmanager
    def base(self) -> Iterator[int]:
        """Hold the model alone with the adapter off (version 0); turn it back on after."""
        with self._lock.write():
            if self.version:
                self.model.disable_adapters()
            try:
                yield 0
            finally:
                if self.version:
                    self.model.enable_adapters()

    def sync(self) -> bool:
        """Swap to the registry's live version if it differs. Returns True if it swapped."""
        with self._syncing:
            return self._sync()

    def _sync(self) -> bool:
        row = self.store.live_adapter()
        target, sha = (row["version"], row["sha256"]) if row else (0, "")
        if target == self.version or self._failed == (target, sha):
            return False
        try:  # on a CPU in a thread of its own (chatbot/model.py load_model: OpenMP teams);
            # on a GPU in this one, the server's long-lived poller (chatbot/threads.py)
            in_fresh_thread_on_cpu(lambda: self._load(row), self._device_type(),
                                   name="adapter-swap")
        except (AdapterError, OSError, ValueError, RuntimeError, TypeError) as exc:
            self._failed = (target, sha)
            self.last_error = f"v{target} not loaded, v{self.version} keeps serving: {exc}"
            log.error("%s", self.last_error)
            return False
        self._failed = None
        self.last_error = None
        if self.store.keeps_adapter_files:  # drop fetched copies of versions the learner deleted
            adapters.remove_versions(self.adapters_dir, {
                a["version"] for a in self.store.adapters() if not a["path"]})
        return True

    def _device_type(self) -> str:
        """The model's device type; "none" where no model is in this process (vLLM's)."""
        return "none" if self.model is None else next(self.model.parameters()).device.type

    def _verified(self, row: dict) -> tuple[Path, adapters.VerifiedAdapter, dict]:
        """The registry row's folder, checked by its manifest hashes (fetched from the
        database first where it is missing), and its parsed weights (shapes, finite)."""
        verified = adapters.verified_copy(self.adapters_dir, row, base_model=self.base_model,
                                          fetch=self.store.adapter_files)
        return self.adapters_dir / row["path"], verified, adapters.load_state_dict(verified)

    def _load(self, row: dict | None) -> None:
        """Serve the registry row's version (None: the base model), or raise saying why not.
        The vLLM engine's live adapter (chatbot/vllm_engine.py) loads it elsewhere."""
        if row is None:
            self._swap(0, None, None)
            return
        _, verified, state = self._verified(row)
        self._swap(row["version"], verified.config, state)

    def _slot_targets(self, config: dict | None, state: dict | None
                      ) -> dict[str, torch.Tensor] | None:
        """The slot's parameter for each saved tensor, when the slot can take this version
        by a copy; None when it must be rebuilt (none yet, or another shape)."""
        if state is None or self._slot is None or any(
                config.get(f) != self._slot_config.get(f) for f in SHAPE_FIELDS):
            return None
        params = dict(self.model.named_parameters())
        targets = {}
        for key, tensor in state.items():
            # saved: base_model.model.<module>.lora_A.weight; loaded: <module>.lora_A.live.weight
            module, _, leaf = key.removeprefix("base_model.model.").rpartition(".")
            param = params.get(f"{module}.{self._slot}.{leaf}")
            if param is None or param.shape != tensor.shape:
                return None
            targets[key] = param
        slot_params = sum(f".{self._slot}." in name for name in params)
        return targets if len(targets) == slot_params else None

    def _swap(self, version: int, config: dict | None, state: dict | None) -> None:
        old = self.version
        targets = self._slot_targets(config, state)  # outside the lock: no model change
        with self._lock.write():
            started = time.perf_counter()
            if version and targets is not None:
                with torch.no_grad():
                    for key, param in targets.items():
                        param.copy_(state[key])
                self.model.set_adapter(self._slot)
                self.model.enable_adapters()
            elif version:
                self._rebuild_slot(config, state)
            elif old:
                self.model.disable_adapters()
            self.version = version
            self.swaps += 1
            self.last_blocking_ms = 1000 * (time.perf_counter() - started)
        log.info("now serving adapter v%d (was v%d), %s in %.1f ms", version, old,
                 "copied" if targets is not None else "loaded", self.last_blocking_ms)

    def _rebuild_slot(self, config: dict, state: dict) -> None:
        """Load the slot's layers anew (first version, or a new shape), under the write lock.
        The new layers load under the other of two names before the old ones go, so a
        version that fails to load leaves the current one serving."""
        from peft import PeftConfig
        from transformers.utils import logging as hf_logging

        from chatbot import serving_lora

        name = SLOTS[1] if self._slot == SLOTS[0] else SLOTS[0]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists LoRA keys as "missing"
        try:
            self.model.load_adapter(adapter_name=name, hotswap=False,
                                    peft_config=serving_lora.lora_config(
                                        PeftConfig.from_peft_type(**config), self.model),
                                    adapter_state_dict=state)
        except Exception:
            if name in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(name)
            raise
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.set_adapter(name)
        self.model.enable_adapters()
        if self._slot:
            self.model.delete_adapter(self._slot)
        self._slot, self._slot_config = name, dict(config)

    def start(self, poll_seconds: float) -> None:
        """Sync now, then keep polling the registry in a daemon thread."""
        self.sync()

        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - the poller must outlive a bad DB moment
                    log.exception("adapter poll failed")

        self._thread = threading.Thread(target=loop, name="adapter-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
