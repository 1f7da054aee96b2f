"""The tests whose code paths depend on the CPU, run again as a CPU without AVX-512 runs them.

CI runs on whatever x86-64 CPU submits: AVX2 only, or AVX-512 with bf16. On an AVX-512 BF16 CPU
the main run takes bitsandbytes' AVX-512 BF16 4-bit kernel (which repacks the weights at
inference), torch's AVX-512 kernels and oneDNN's bf16, and --dtype auto samples in bf16; here
the tests that depend on those run once more in a pytest subprocess with DUET_TEST_CPU_PATH=avx2,
where tests/conftest.py makes bitsandbytes, torch and the project take their AVX2 paths.

Left out: the other direction. AVX-512 cannot be emulated on an AVX2-only CPU, so there this
test skips (the main run already takes the AVX2 paths) and the AVX-512 paths go untested.
Also left out: choices made below Python. libbitsandbytes_cpu's 4-bit dequantize asks cpuid
itself and keeps its AVX-512 loop, and MKL's setting cannot be read back to check it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from chatbot.model import cpu_flags, load_model, resolve_dtype

ROOT = Path(__file__).resolve().parent.parent
FORCED = os.environ.get("DUET_TEST_CPU_PATH") == "avx2"

# On the AVX2 paths these must pass, not skip ...
RUN_ON_AVX2 = [
    "tests/test_cpu_paths.py::test_the_avx2_paths_are_taken",
    "tests/test_model.py::test_bitsandbytes_quantization_loads_on_cpu",  # 4bit and 8bit
    "tests/test_model.py::test_a_quantized_load_keeps_its_own_compute_dtype",
    "tests/test_model.py::test_4bit_on_cpu_refuses_widths_the_cpu_kernel_cannot_run",
    "tests/test_learner.py::test_a_round_on_a_4bit_base",
    "tests/test_int4.py::test_a_4bit_layer_computes_what_its_blocks_stand_for",  # torch's int4
    "tests/test_int4.py::test_a_model_with_4bit_layers_samples_and_keeps_its_output_layer",
    "tests/test_int4.py::test_the_server_serves_adapter_versions_on_4bit_layers",
    "tests/test_int4.py::test_behaviour_logprobs_on_4bit_layers_match_a_fresh_forward_pass",
]
# ... and these need native bf16, so they must skip there.
SKIP_ON_AVX2 = [
    "tests/test_model.py::test_bf16_serving_and_learning_on_a_native_bf16_cpu",
    "tests/test_embedded.py::test_bf16_sampling_records_logprobs_within_bf16_rounding",
]


def outcomes(junit_xml: Path) -> dict[str, set[str]]:
    """Node id (without parameters) -> the outcomes of its runs, from pytest's JUnit XML."""
    found: dict[str, set[str]] = {}
    for case in ET.parse(junit_xml).iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name").split("[")[0]
        outcome = next((tag for tag in ("failure", "error", "skipped")
                        if case.find(tag) is not None), "passed")
        found.setdefault(node, set()).add(outcome)
    return found


# cpu_flags() hides AVX-512 under DUET_TEST_CPU_PATH=avx2 too, so this skips in the subprocess.
@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in cpu_flags(),
                    reason="this CPU takes the AVX2 paths in the main run already")
def test_the_cpu_dependent_tests_pass_on_the_avx2_paths(tmp_path):
    junit_xml = tmp_path / "avx2.xml"
    env = {**os.environ, "DUET_TEST_CPU_PATH": "avx2", "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit_xml}", *RUN_ON_AVX2, *SKIP_ON_AVX2],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"on the AVX2 paths:\n{tail}"
    found = outcomes(junit_xml)
    assert {node: found.get(node) for node in RUN_ON_AVX2} == {
        node: {"passed"} for node in RUN_ON_AVX2}, tail
    assert {node: found.get(node) for node in SKIP_ON_AVX2} == {
        node: {"skipped"} for node in SKIP_ON_AVX2}, tail


@pytest.mark.skipif(not FORCED, reason="checks DUET_TEST_CPU_PATH=avx2 (set by the test above)")
def test_the_avx2_paths_are_taken(tiny_config):
    import bitsandbytes as bnb

    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert load_model(dataclasses.replace(tiny_config, dtype="auto")).dtype == torch.float32
    # Registered at bitsandbytes' import only on AVX-512 BF16 CPUs: the default kernel runs here.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::gemv_4bit", "CPU")

    loaded = load_model(dataclasses.replace(tiny_config, quantize="4bit"))
    with torch.no_grad():  # inference, where bitsandbytes repacks on AVX-512 BF16 CPUs
        loaded.model(torch.tensor([[1, 2, 3]]))
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in layers)
