#!/usr/bin/env bash
# BERT-large pretraining throughput on GPU: seq 128, bf16 and fp16 (ZeRO-2), a few hundred steps
# each, tp=1 on one GPU (and tp=2 when two GPUs are visible). Prints, per run, the last interval's
# seq/s, non-pad tokens/s, TFLOP/s per GPU, MFU and peak memory, from the trainer's own metrics
# line (FLOPs formula in docs/pretrain.md). Goal: >= 2,000 seq/s on one H100 (~50% MFU).
#
#   bash benchmarks/gpu_check.sh                 # STEPS=300 MICRO=64 by default
#   STEPS=200 MICRO=128 bash benchmarks/gpu_check.sh
#
# Needs deepspeed and megatron-core importable. On a bare GPU image (Python 3.12) carry them as
# wheels in .whl/ (see the device notes): megatron-core ships manylinux wheels; deepspeed is an
# sdist, so build a py3-none-any wheel once on a machine with pip:
#   DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed==0.19.8
# and `pip install --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site` before running.
# DeepSpeed's fused Adam/Lamb then JIT-compile on first use (needs nvcc; ~1 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
STEPS=${STEPS:-300}
MICRO=${MICRO:-64}
WORK=${WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
rm -f "$OUT/results.txt"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "no CUDA GPU visible: this check needs one" >&2; exit 1; fi
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| GPUs:', $NGPU)"

# Data: a 2,000-document slice of the embedded corpus is plenty for throughput (the sample order
# wraps into further epochs; tokens per sequence are what they are on real data).
DATA=$WORK/data
$PY - "$DATA" <<'PYEOF'
import sys
from data_prep.testing import build_tiny_dataset
build_tiny_dataset(sys.argv[1], seq_lengths=(128,), n_docs=2000, workers=8)
PYEOF

LAUNCH="$PY -m deepspeed.launcher.runner"
command -v deepspeed >/dev/null && LAUNCH=deepspeed

run() {  # name ds_config ngpu tp
  local name=$1 cfg=$2 ngpu=$3 tp=$4 log=$OUT/$1.log
  rm -rf "$WORK/run_$name"
  echo "== $name: BERT-large seq 128, $cfg, $ngpu GPU(s), tp=$tp, micro $MICRO, $STEPS steps"
  $LAUNCH --num_gpus "$ngpu" --master_port $((29600 + RANDOM % 1000)) pretrain/run.py \
    --ds_config "$cfg" --model_config configs/bert-large.json --data "$DATA" --seq_length 128 \
    --train_steps "$STEPS" --micro_batch_size "$MICRO" --tp "$tp" --save_dir "$WORK/run_$name" \
    --log_interval 50 --eval_interval 0 --eval_samples 512 --save_interval 1000000 --keep_last 1 \
    --no-tensorboard > "$log" 2>&1 || { echo "FAILED, see $log"; tail -30 "$log"; return 0; }
  # the last interval line: steady state (the first intervals include JIT and allocator warm-up)
  grep "pretrain.metrics: step " "$log" | tail -1 | $PY -c '
import sys
line = sys.stdin.read().split("pretrain.metrics: ", 1)[1]
f = dict(p.split(" ", 1) for p in line.strip().split(" | "))
print(f"RESULT '"$name"': seq/s {f[\"seqs_per_s\"]} | tokens/s {f[\"tokens_per_s\"]} | TFLOP/s/GPU {f[\"tflops\"]} | MFU {f[\"mfu\"]} | peak mem GB {f[\"mem_gb\"]} | loss {f[\"loss\"]}")
'  | tee -a "$OUT/results.txt"
}

run bf16_tp1 configs/zero2.json 1 1
run fp16_tp1 configs/zero2_fp16.json 1 1
if [ "$NGPU" -ge 2 ]; then
  run bf16_tp2 configs/zero2.json 2 2
  run bf16_dp2 configs/zero2.json 2 1
fi
echo "== summary"
cat "$OUT/results.txt" 2>/dev/null || true
