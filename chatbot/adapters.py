"""Adapter folders on disk: atomic publishing, manifests, verification, retention.

A published adapter is `adapters/v{N}/`: the files PEFT's `save_pretrained` writes
(`adapter_config.json`, `adapter_model.safetensors`; loadable by `PeftModel.from_pretrained`
and by vLLM's LoRA loader unchanged) plus `manifest.json` with the sha256 of every file, the
base model id, the parent version and the round's metrics. The folder is written under a
temporary name in the same directory, fsynced, and renamed into place with `os.replace`, so a
reader sees a complete folder or none. The DB registry stores the manifest's own sha256, so
the chain DB -> manifest -> files is checked before anything is loaded.

With PostgreSQL the registry also keeps each version's files (`Store.adapter_files`), so a
process on another host needs no shared folder: `verified_copy` fetches a version it lacks
(or holds a bad copy of) into its own adapters folder, the same atomic way, and checks it by
the same chain before anyone loads it.

Left out: signing, object stores (the database carries the few MB of a LoRA adapter).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbot.errors import AdapterError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
TMP_PREFIX = ".tmp-"


def version_dir(adapters_dir: Path, version: int) -> Path:
    return Path(adapters_dir) / f"v{version}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(adapters_dir: Path, version: int, save: Callable[[Path], None], *,
            base_model: str, parent_version: int, metrics: dict) -> tuple[Path, str]:
    """Write an adapter with `save(folder)`, add its manifest, and move it to `v{version}`.

    Returns the final folder and the manifest's sha256 (for the DB registry).
    """
    adapters_dir = Path(adapters_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapters_dir / f"{TMP_PREFIX}v{version}-{uuid.uuid4().hex[:8]}"
    final = version_dir(adapters_dir, version)
    try:
        tmp.mkdir()
        save(tmp)
        files = {}
        for path in sorted(tmp.iterdir()):
            if path.is_file() and path.name != MANIFEST:
                files[path.name] = sha256_bytes(path.read_bytes())
                _fsync(path)
        if CONFIG not in files or WEIGHTS not in files:
            raise AdapterError(f"save() wrote {sorted(files)}, expected {CONFIG} and {WEIGHTS}")
        manifest = {"version": version, "parent_version": parent_version,
                    "base_model": base_model, "files": files, "metrics": metrics}
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # left by a crash after the rename but before registration
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(adapters_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, sha256_bytes(manifest_bytes)


@dataclass
class VerifiedAdapter:
    version: int
    manifest: dict
    config: dict  # adapter_config.json
    weights: bytes  # adapter_model.safetensors, the very bytes that were hashed


def read_verified(folder: Path, *, base_model: str, manifest_sha256: str | None = None
                  ) -> VerifiedAdapter:
    """Read an adapter folder and check it against its manifest (and the manifest's hash).

    Raises AdapterError naming the first problem found. The returned bytes are the ones
    that were hashed, so nothing can change between checking and loading.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder} does not exist")
    try:
        manifest_bytes = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{folder.name}: no {MANIFEST}") from None
    if manifest_sha256 is not None and sha256_bytes(manifest_bytes) != manifest_sha256:
        raise AdapterError(f"{folder.name}: {MANIFEST} does not match the registry's hash")
    try:
        manifest = json.loads(manifest_bytes)
        files = dict(manifest["files"])
        version = int(manifest["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{folder.name}: unreadable {MANIFEST} ({exc})") from None
    if manifest.get("base_model") != base_model:
        raise AdapterError(f"{folder.name}: trained on {manifest.get('base_model')!r}, "
                           f"but this server runs {base_model!r}")
    contents = {}
    for name in (CONFIG, WEIGHTS):
        if name not in files:
            raise AdapterError(f"{folder.name}: {MANIFEST} lists no {name}")
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            raise AdapterError(f"{folder.name}: {name} is missing") from None
        if sha256_bytes(data) != files[name]:
            raise AdapterError(f"{folder.name}: {name} does not match its sha256 in {MANIFEST}")
        contents[name] = data
    try:
        config = json.loads(contents[CONFIG])
    except ValueError as exc:
        raise AdapterError(f"{folder.name}: unreadable {CONFIG} ({exc})") from None
    return VerifiedAdapter(version, manifest, config, contents[WEIGHTS])


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a published adapter folder (name -> bytes), manifest included."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())
            if path.is_file()}


def install(adapters_dir: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write fetched adapter files as the folder `name`, atomically (temporary folder, fsync,
    rename), replacing a folder of that name. The caller verifies them after."""
    adapters_dir = Path(adapters_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    if Path(name).name != name or not name.startswith("v") or any(
            Path(f).name != f for f in files):
        raise AdapterError(f"refusing to write adapter files outside {adapters_dir}: {name!r}")
    tmp = adapters_dir / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    final = adapters_dir / name
    try:
        tmp.mkdir()
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
            _fsync(tmp / file_name)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(adapters_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def verified_copy(adapters_dir: Path, row: dict, *, base_model: str,
                  fetch: Callable[[int], dict[str, bytes]]) -> VerifiedAdapter:
    """The registry row's adapter from the local folder, checked by `read_verified`; if the
    folder is missing or fails the check, its files are fetched (`fetch(version)`, e.g.
    `Store.adapter_files`, which is empty where the database keeps no files), written in
    place of the folder and checked again."""
    if not row.get("path"):
        raise AdapterError(f"v{row['version']} has no folder on disk any more")
    folder = Path(adapters_dir) / row["path"]
    try:
        return read_verified(folder, base_model=base_model, manifest_sha256=row["sha256"])
    except AdapterError:
        files = fetch(row["version"])
        if not files:
            raise
        log.info("fetched v%d from the database (%d bytes)", row["version"],
                 sum(map(len, files.values())))
    install(adapters_dir, row["path"], files)
    return read_verified(folder, base_model=base_model, manifest_sha256=row["sha256"])


def load_state_dict(adapter: VerifiedAdapter) -> dict:
    """Parse the weights and check their LoRA shapes against the config's rank."""
    from safetensors.torch import load

    try:
        state = load(adapter.weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise AdapterError(f"v{adapter.version}: unreadable weights ({exc})") from None
    rank = adapter.config.get("r")
    if not state or not isinstance(rank, int):
        raise AdapterError(f"v{adapter.version}: no LoRA weights or no rank in the config")
    for name, tensor in state.items():
        bad = ((".lora_A." in name and tensor.shape[0] != rank)
               or (".lora_B." in name and tensor.shape[-1] != rank))
        if bad:
            raise AdapterError(f"v{adapter.version}: {name} has shape {tuple(tensor.shape)}, "
                               f"which does not fit rank {rank}")
        if not tensor.isfinite().all():
            raise AdapterError(f"v{adapter.version}: {name} holds NaN or infinite values")
    return state


def remove_versions(adapters_dir: Path, versions: set[int]) -> list[Path]:
    """Delete the folders of these versions (copies of versions the learner deleted)."""
    removed = []
    for version in versions:
        folder = version_dir(adapters_dir, version)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def remove_stale(adapters_dir: Path, registered: set[int]) -> list[Path]:
    """Delete temporary folders and version folders the registry does not know."""
    removed = []
    adapters_dir = Path(adapters_dir)
    if not adapters_dir.is_dir():
        return removed
    for path in adapters_dir.iterdir():
        stale = path.name.startswith(TMP_PREFIX) or (
            path.name.startswith("v") and path.name[1:].isdigit()
            and int(path.name[1:]) not in registered)
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
