"""Memory handed back: the kernel cache cap reaches child processes unless the environment sets
its own, and every pair ends with its freed pages released, finished or abandoned."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys

import pytest

from chatbot import heap
from chatbot.sampling import PairGenerator

MESSAGES = [{"role": "user", "content": "Say something short."}]


def test_the_kernel_cache_cap_reaches_child_processes(monkeypatch):
    monkeypatch.delenv(heap.KERNEL_CACHE, raising=False)
    assert heap.cap_kernel_cache() == heap.KERNEL_CACHE_SIZE
    show = f"import os; print(os.environ['{heap.KERNEL_CACHE}'])"
    child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                           check=True)
    assert child.stdout.strip() == str(heap.KERNEL_CACHE_SIZE)


def test_a_cap_set_in_the_environment_is_kept(monkeypatch):
    monkeypatch.setenv(heap.KERNEL_CACHE, "256")
    assert heap.cap_kernel_cache() == 256
    assert os.environ[heap.KERNEL_CACHE] == "256"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_hands_freed_heap_pages_back_on_glibc():
    # Many blocks below malloc's mmap threshold, then one more that keeps them off the top of
    # the heap (free() gives back the top by itself): freed, their pages stay until trimmed.
    blocks = [bytearray(64 * 1024) for _ in range(2000)]
    pin = bytearray(64 * 1024)
    del blocks
    assert heap.release() is True
    del pin


@pytest.fixture
def releases(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(heap, "release", lambda: calls.append(1) or True)
    return calls


def test_every_pair_releases_its_memory_once(tiny_loaded, tiny_config, releases):
    generator = PairGenerator(tiny_loaded, dataclasses.replace(tiny_config, max_new_tokens=6))
    generator.sample(MESSAGES)
    generator.sample(MESSAGES)
    assert len(releases) == 2


def test_an_abandoned_pair_releases_its_memory_too(tiny_loaded, tiny_config, releases):
    generator = PairGenerator(tiny_loaded, dataclasses.replace(tiny_config, max_new_tokens=6))
    stream = generator.stream(MESSAGES)
    next(iter(stream))
    stream._chunks.close()  # what Gradio does when the browser goes away
    assert releases == [1]
