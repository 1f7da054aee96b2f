"""What every benchmark records beside its numbers: the machine, versions, settings, commit."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


class BadRequest(ValueError):
    """A benchmark was asked for something it cannot do (a suite user it has not, a user
    outside the claim's range, nothing kept to summarize): `python -m bench` says it in one
    line. Any other error keeps its traceback."""
# The CPU flags that decide which kernels torch and bitsandbytes take (and --dtype auto).
SIMD_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                        "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve"})


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    import torch

    from chatbot.model import cpu_flags

    info = {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "cpu": cpu_model(),
            "cpu_flags": sorted(cpu_flags() & SIMD_FLAGS)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_STARTED_AT_COMMIT: str | None = None


def remember_commit() -> None:
    """Record the commit when a benchmark starts (the tree may change while it runs)."""
    global _STARTED_AT_COMMIT
    _STARTED_AT_COMMIT = git_commit()


def slug(text: str, limit: int | None = None) -> str:
    """A file-name part from free text (an oracle's name or pattern): a-z, 0-9 and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit]


def write_result(name: str, settings: dict, results: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": machine(), "commit": _STARTED_AT_COMMIT or git_commit(),
              "settings": settings,
              "results": results}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def device_tag(loaded) -> str:
    """cpu, cuda, cuda-4bit, ...: result files of different devices do not overwrite."""
    return loaded.device.type + ("" if loaded.quantize == "none" else f"-{loaded.quantize}")
