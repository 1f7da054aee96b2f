"""Keep the server's model on the live adapter version, swapping between requests.

Generation holds a read lock for a whole pair, so any number of pairs run at once on the same
version; a swap takes the write lock, which waits for the pairs in flight to finish (each
finishes on the version it started with) and holds new ones back for the ~0.3 s the swap
takes. Every new version is loaded under its own adapter name (`v{N}`) and the previous one is
deleted, so memory stays flat however many versions go by. Version 0 is the base model.

A version that fails verification is never loaded: the current one keeps serving, and the
reason is kept in `last_error` (shown by /status) until a later version loads.

Left out: serving several versions at once (PEFT's mixed-adapter batches would allow it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from chatbot import adapters
from chatbot.errors import AdapterError
from chatbot.store import Store

log = logging.getLogger(__name__)

# Each swap briefly holds two adapters (the new one loads before the old one is deleted).
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


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
        self._lock = RWLock()
        self._failed: tuple[int, str] | None = None  # (version, manifest sha) not to retry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the current version in place; yields its number."""
        with self._lock.read():
            yield self.version

    def sync(self) -> bool:
        """Swap to the registry's live version if it differs. Returns True if it swapped."""
        row = self.store.live_adapter()
        target, sha = (row["version"], row["sha256"]) if row else (0, "")
        if target == self.version or self._failed == (target, sha):
            return False
        try:
            state = config = None
            if target:
                if not row["path"]:
                    raise AdapterError(f"v{target} has no folder on disk any more")
                verified = adapters.read_verified(
                    self.adapters_dir / row["path"], base_model=self.base_model,
                    manifest_sha256=sha)
                state = adapters.load_state_dict(verified)
                config = verified.config
            self._swap(target, config, state)
        except (AdapterError, OSError, ValueError, RuntimeError, TypeError) as exc:
            self._failed = (target, sha)
            self.last_error = f"v{target} not loaded, v{self.version} keeps serving: {exc}"
            log.error("%s", self.last_error)
            return False
        self._failed = None
        self.last_error = None
        return True

    def _swap(self, version: int, config: dict | None, state: dict | None) -> None:
        from peft import PeftConfig
        from transformers.utils import logging as hf_logging

        old = self.version
        with self._lock.write():
            if version:
                name = f"v{version}"
                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()  # its load report lists LoRA keys as "missing"
                try:
                    self.model.load_adapter(adapter_name=name, hotswap=False,
                                            peft_config=PeftConfig.from_peft_type(**config),
                                            adapter_state_dict=state)
                except Exception:
                    if name in getattr(self.model, "peft_config", {}):
                        self.model.delete_adapter(name)
                    raise
                finally:
                    hf_logging.set_verbosity(verbosity)
                self.model.set_adapter(name)
                self.model.enable_adapters()
            elif old:
                self.model.disable_adapters()
            if old:
                self.model.delete_adapter(f"v{old}")
            self.version = version
            self.swaps += 1
        log.info("now serving adapter v%d (was v%d)", version, old)

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
