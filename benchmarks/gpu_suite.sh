#!/usr/bin/env bash
# Everything issue 13 measures that needs a GPU, in one call on one CUDA device, in under 8 minutes:
#   speed.py's GPU rows (B/16 and L/14, LoRA and full fine-tuning, batch 64, step only; B/16 LoRA end to end)
#   and memory.py's CUDA rows (L/14 and B/16 QLoRA at batch 64), then one TARGET line per target.
#
#   bash benchmarks/gpu_suite.sh                        # on the GPU machine, from the repository root
#   bash benchmarks/gpu_suite.sh --device cpu --steps 2 # smoke: the same python parts on tiny shapes, CPU
#
# Wheels the GPU machine lacks (bitsandbytes, open_clip_torch + ftfy + wcwidth) travel in .whl/ (git-ignored):
#   bash benchmarks/fetch_gpu_wheels.sh                 # here, once (about 46 MB)
# and the device call names `.whl` in carry. A row whose packages are missing prints SKIP with the reason.
# Results land in benchmarks/results/ (speed/*.json, memory_cuda_*.json, README tables) and, when $OUT is set,
# are copied there too. Smoke mode writes to a temporary folder only.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

DEVICE=cuda
STEPS=16
BUDGET=450  # seconds for all rows: under 8 minutes with start-up and the summary
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
START=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheels in .whl/ did not install" >&2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
has() { "$PY" -c "import $1" > /dev/null 2>&1; }

if [ "$DEVICE" = cuda ]; then
  SHAPE_B16=b16; SHAPE_L14=l14; BATCH=64; PAIRS=2; WARMUP=4; EXAMPLES=1024
  RESULTS=benchmarks/results; README=benchmarks/README.md
  MEM_B16=(--model openai/clip-vit-base-patch16 --batch 64 --tokens 77)
  MEM_L14=(--model openai/clip-vit-large-patch14 --batch 64 --tokens 77)
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "SKIP everything: no CUDA device visible to torch"; exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else  # smoke: every python part once, tiny and small, nothing committed
  SHAPE_B16=tiny; SHAPE_L14=tiny; BATCH=4; PAIRS=1; WARMUP=1; EXAMPLES=8
  RESULTS=$(mktemp -d); README=$RESULTS/README.md
  MEM_B16=(--model openai/clip-vit-base-patch32 --batch 1 --tokens 8); MEM_L14=("${MEM_B16[@]}")
fi
mkdir -p "$RESULTS/speed"
echo "device $DEVICE, results in $RESULTS"

for pkg in torch transformers peft accelerate; do
  has "$pkg" || { echo "SKIP everything: python package $pkg is missing"; exit 1; }
done
has mmpeft || { echo "SKIP everything: mmpeft does not import: $("$PY" -c 'import mmpeft' 2>&1 | tail -1)"; exit 1; }

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

row() {  # row NAME SECONDS_NEEDED COMMAND...: run it if the budget still holds that much, else SKIP
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "SKIP $name: $(left) s of the ${BUDGET} s budget left, it needs about $need s"; return
  fi
  echo "== $name ($(left) s left)"
  # timeout runs programs, not shell functions; --kill-after ends a run that ignores TERM
  if timeout --kill-after=10 "$(left)" "$@"; then echo "DONE $name"; else echo "FAILED $name (exit $?)"; fi
}

SPEED=("$PY" benchmarks/speed.py --device "$DEVICE" --batch "$BATCH" --pairs "$PAIRS" --warmup "$WARMUP"
       --precision bf16 --out "$RESULTS/speed" --readme "$README")
row "speed B/16 LoRA + full, step" 120 "${SPEED[@]}" --shapes "$SHAPE_B16" --modes lora full --kinds step \
  --steps "$STEPS"
row "speed B/16 LoRA, end to end" 90 "${SPEED[@]}" --shapes "$SHAPE_B16" --modes lora --kinds e2e --pairs 1 \
  --e2e-examples "$EXAMPLES" --steps "$STEPS"
row "speed L/14 LoRA + full, step" 90 "${SPEED[@]}" --shapes "$SHAPE_L14" --modes lora full --kinds step \
  --pairs 1 --steps "$STEPS"

if has bitsandbytes; then
  for name in l14 b16; do  # one memory.py run each, its JSON kept under its own name
    if [ "$name" = l14 ]; then args=("${MEM_L14[@]}"); else args=("${MEM_B16[@]}"); fi
    row "memory $name QLoRA" 50 "$PY" benchmarks/memory.py "${args[@]}" --steps 1 --modes qlora_nf4+gc lora_bf16 \
      --results "$RESULTS/mem-$name" --readme "$README"
    cp "$RESULTS/mem-$name"/memory_*.json "$RESULTS/memory_${DEVICE}_$name.json" 2>/dev/null
  done
else
  echo "SKIP memory rows (QLoRA): bitsandbytes is missing; carry it in .whl/ (benchmarks/fetch_gpu_wheels.sh)"
fi
has open_clip || echo "SKIP open_clip rows: open_clip_torch is missing (none in this suite needs it yet)"

"$PY" benchmarks/gpu_targets.py --results "$RESULTS"
if [ -n "${OUT:-}" ] && [ "$DEVICE" = cuda ]; then
  mkdir -p "$OUT/speed" && cp "$RESULTS"/speed/cuda-*.json "$OUT/speed/" 2>/dev/null
  cp "$RESULTS"/memory_cuda_*.json "$README" "$OUT/" 2>/dev/null
fi
echo "suite done in $(( $(date +%s) - START )) s"
