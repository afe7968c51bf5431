#!/usr/bin/env bash
# The prepared GPU check, one call on a bare H100/H200 image (device tool, kind nvidia-h200):
#   1. installs from .whl/ what the image lacks (deepspeed, megatron-core, pydantic, hjson; no network there),
#   2. runs `pytest tests/gpu -m gpu` (its summary goes into the results file; test_unpad_cuda.py: the unpadded
#      encoder reaches flash / memory-efficient SDPA and syncs nowhere, bf16 and fp32 training),
#   3. BERT-large seq-128 pretraining throughput, ZeRO-2: bf16 padded (--no-unpad), unpadded (the trainer's
#      default) and packed (--pack_sequences) and fp16 unpadded at tp=1 on one GPU (and bf16 unpadded and packed
#      at tp=2 and at dp=2 when two GPUs are visible), reading the trainer's own metrics (FLOPs formula:
#      docs/pretrain.md; tokens/s, TFLOP/s and MFU count real tokens only, so the three layouts compare directly),
# and writes ONE results file, $OUT/gpu_check_results.txt (seq/s, tokens/s, TFLOP/s per GPU, MFU, peak memory),
# plus the logs under $OUT/logs/. $OUT defaults to /tmp/gpu_check/out.
#
# Before the call, HERE (a machine with pip and .venv):   bash benchmarks/gpu_wheels.sh   (fills .whl/, ~9 MiB)
# The device call, exactly (one call; the reply's output_tail ends with the results file):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Time budget (one H100-class GPU; BUDGET_S=570 in all, under the call's 600 s; every part under `timeout`,
# and a part whose minimum no longer fits is skipped and reported, so one hang cannot eat the rest):
#   install ~15 s (cap 60) | pytest ~2-3 min (cap 240; the trainer tests start DeepSpeed twice) | each run ~1-1.5 min (cap 140): start-up ~40 s, STEPS=200
#   steps of MICRO=128 (~15 s at 2,000 seq/s), end-of-run eval + the 5 GB ZeRO checkpoint the trainer always writes.
#   The reported figures are the last log interval (steps 151-200: warm-up and JIT are over); the previous
#   interval's seq/s is shown beside them as a steadiness check.
#   With the three layouts the runs no longer all fit beside pytest in one 600 s call: they run in the order
#   below (padded, unpadded, packed first) and what does not fit is reported SKIPPED; SKIP_PYTEST=1 spends the
#   call on the throughput runs only (a second call after the pytest one).
# Knobs (environment): STEPS, LOG_INTERVAL, MICRO, MODEL_CONFIG, BUDGET_S, DATA, PY, WORK, OUT, SKIP_PYTEST.
# A CPU rehearsal of the script's plumbing (no GPU; fp16 is then refused by DeepSpeed, as it should be):
#   ALLOW_CPU=1 DS_ACCELERATOR=cpu PY=.venv/bin/python MODEL_CONFIG=configs/bert-tiny.json STEPS=20 \
#     LOG_INTERVAL=10 MICRO=8 bash benchmarks/gpu_check.sh          # REHEARSE_NGPU=2: the two-GPU runs too
set -uo pipefail   # no -e: each part fails on its own and is reported
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-200}
LOG_INTERVAL=${LOG_INTERVAL:-50}
MICRO=${MICRO:-128}
MODEL_CONFIG=${MODEL_CONFIG:-configs/bert-large.json}
BUDGET_S=${BUDGET_S:-570}
WORK=${WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
LOGS=$OUT/logs
RESULTS=$OUT/gpu_check_results.txt
mkdir -p "$WORK" "$LOGS"
: > "$RESULTS"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}

say() { echo "$*" | tee -a "$RESULTS"; }
left() { echo $((BUDGET_S - SECONDS)); }
# cap_for CAP MIN: the timeout for a part (its cap, or what is left of the budget), or nothing when < MIN
cap_for() { local t; t=$(left); [ "$t" -gt "$1" ] && t=$1; [ "$t" -ge "$2" ] && echo "$t"; }
trap 'say "== ended after ${SECONDS} s of BUDGET_S=${BUDGET_S}"' EXIT

rev=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || rev="$rev+local changes"; }
say "== gpu_check $(date -u +%FT%TZ) | git ${rev:-n/a}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
  2>&1 | sed 's/^/   nvidia-smi: /' | tee -a "$RESULTS"

# --- 1. install what the image lacks, from .whl/ (a wheel is skipped when the image has that version or newer)
t0=$SECONDS
SITE=$WORK/site
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  need=$("$PY" - .whl 2>>"$LOGS/install.log" <<'PYEOF'
import glob, importlib.metadata as md, os, sys
from packaging.utils import parse_wheel_filename
from packaging.version import Version
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name, version, _, _ = parse_wheel_filename(os.path.basename(path))
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is not None and have >= version:
        print(f"skip {name} {version}: the image has {have}", file=sys.stderr)
    else:
        print(path)
PYEOF
)
  if [ -n "$need" ]; then
    # shellcheck disable=SC2086
    timeout -k 10 "$(cap_for 60 10)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" $need >>"$LOGS/install.log" 2>&1 || say "   pip install FAILED (see logs/install.log)"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  say "== install ($((SECONDS - t0)) s): $(echo $need | wc -w) wheel(s) from .whl/ into $SITE"
else
  say "== install: no .whl/ (run benchmarks/gpu_wheels.sh before the call); using what the image has"
fi
"$PY" - >>"$RESULTS" 2>>"$LOGS/install.log" <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
import torch
line = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s))"]
for name in ("deepspeed", "megatron-core", "pydantic", "numpy"):
    try:
        line.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        line.append(f"{name} MISSING")
print("   " + " | ".join(line))
unmet = []
for name in ("deepspeed", "megatron-core"):
    try:
        reqs = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            if not r.specifier.contains(md.version(r.name), prereleases=True):
                unmet.append(f"{name} needs {r}, has {md.version(r.name)}")
        except md.PackageNotFoundError:
            unmet.append(f"{name} needs {r}, missing")
print("   requirements: " + ("; ".join(unmet) if unmet else "all met"))
for mod in ("deepspeed", "megatron.core.tensor_parallel"):
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001 - reported, the parts below then fail visibly
        print(f"   import {mod} FAILED: {type(e).__name__}: {e}")
PYEOF

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -lt 1 ]; then
  if [ "${ALLOW_CPU:-0}" != 1 ]; then say "no CUDA GPU visible: this check needs one"; exit 1; fi
  NGPU=${REHEARSE_NGPU:-1}
  say "   (ALLOW_CPU=1: a CPU rehearsal as $NGPU GPU(s), figures meaningless)"
fi

# --- 2. the GPU tests
t0=$SECONDS
if [ "${SKIP_PYTEST:-0}" = 1 ]; then
  say "== pytest: SKIPPED (SKIP_PYTEST=1)"
elif T=$(cap_for 240 60); then
  timeout -k 15 "$T" "$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider --durations=8 >"$LOGS/pytest.log" 2>&1
  rc=$?
  say "== pytest tests/gpu -m gpu: exit $rc$([ $rc = 124 ] && echo ' (TIMEOUT)') in $((SECONDS - t0)) s"
  # the summary: pytest's short summary (failures, skips) to the end, else its last lines; all of it: logs/pytest.log
  summary=$(awk '/short test summary info/ {p=1} p' "$LOGS/pytest.log" | tail -40)
  [ -n "$summary" ] || summary=$(tail -3 "$LOGS/pytest.log")
  [ "$rc" = 124 ] && summary=$(tail -15 "$LOGS/pytest.log")
  echo "$summary" | sed 's/^/   /' >>"$RESULTS"
else
  say "== pytest: SKIPPED, not enough of the budget left"
fi

# --- 3. data: prepared by gpu_wheels.sh (real text, bert-base-uncased vocab); else a synthetic corpus built here
DATA=${DATA:-}
if [ -z "$DATA" ]; then
  DATA=$WORK/data
  rm -rf "$DATA"
  if [ -f .whl/data/manifest.json ]; then
    cp -r .whl/data "$DATA"
    say "== data: .whl/data (first 2,000 documents of the embedded Wikipedia corpus, seq 128)"
  else
    "$PY" -c "import sys; sys.path.insert(0, '.'); from tests.unit._pretrain_fixtures import build_synthetic_dataset as b; \
b(sys.argv[1], n_docs=2000, seq_lengths=(128,))" "$DATA" >>"$LOGS/install.log" 2>&1
    say "== data: no .whl/data, a synthetic corpus (tests/unit/_pretrain_fixtures.py): token counts less realistic"
  fi
fi

# --- 4. throughput runs
say "== throughput: $MODEL_CONFIG, seq 128, ZeRO-2, micro batch $MICRO per GPU, $STEPS steps, figures of the last $LOG_INTERVAL"
printf '   %-9s | %-9s | %4s | %2s | %8s | %9s | %11s | %6s | %11s | %6s | %7s | %s\n' run precision GPUs tp seq/s tokens/s \
  "TFLOP/s/GPU" MFU "peak mem GB" loss skipped "seq/s interval before" | tee -a "$RESULTS"

run_case() {  # name ds_config ngpu tp [trainer flags: the layout]
  local name=$1 cfg=$2 ngpu=$3 tp=$4 log=$LOGS/$1.log dir=$WORK/run_$1 T rc t0=$SECONDS
  local layout=("${@:5}")
  if ! T=$(cap_for 140 75); then say "   $name: SKIPPED, not enough of the budget left ($(left) s)"; return; fi
  rm -rf "$dir"
  local launch=("$PY")
  [ "$ngpu" -gt 1 ] && launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$ngpu")
  timeout -k 40 "$T" "${launch[@]}" pretrain/run.py --ds_config "$cfg" --model_config "$MODEL_CONFIG" \
    --data "$DATA" --seq_length 128 --train_steps "$STEPS" --micro_batch_size "$MICRO" --tp "$tp" \
    --save_dir "$dir" --log_interval "$LOG_INTERVAL" --eval_interval 0 --eval_samples "$MICRO" \
    --save_interval 1000000 --keep_last 1 --no-tensorboard "${layout[@]}" >"$log" 2>&1
  rc=$?
  # torchrun starts its workers in sessions of their own: end any this run left behind, by id.
  for pid in $(pgrep -f -- "--save_dir $dir " 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  "$PY" - "$dir/metrics.jsonl" "$name" "$ngpu" "$tp" "$rc" "$log" <<'PYEOF' | tee -a "$RESULTS"
import json, re, sys
path, name, ngpu, tp, rc, log = sys.argv[1:]
try:
    train = [r for r in map(json.loads, open(path)) if r.get("kind") == "train"]
except (OSError, ValueError):
    train = []
text = open(log, errors="replace").read()
m = re.search(r"ZeRO-\d \| (\w+) \|", text)
precision = m.group(1) if m else "?"
if not train:
    tail = " / ".join(l.strip() for l in text.strip().splitlines()[-3:])[-300:]
    print(f"   {name:<9} | FAILED (exit {rc}, no metrics line): {tail}")
    sys.exit()
last, prev = train[-1], (train[-2] if len(train) > 1 else None)
f = lambda v, spec: "n/a" if v is None else format(v, spec)
note = "" if rc == "0" else f"   (exit {rc} after the last metrics line)"
print(f"   {name:<9} | {precision:<9} | {ngpu:>4} | {tp:>2} | {f(last.get('seqs_per_s'), '8.1f')} | "
      f"{f(last.get('tokens_per_s'), '9.0f')} | {f(last.get('tflops'), '11.1f')} | "
      f"{'   n/a' if last.get('mfu') is None else format(100 * last['mfu'], '5.1f') + '%'} | {f(last.get('mem_gb'), '11.1f')} | "
      f"{f(last.get('loss'), '6.3f')} | {f(last.get('skipped'), '7d')} | "
      f"{f(prev.get('seqs_per_s') if prev else None, '.1f')} (step {prev['step'] if prev else '-'}), "
      f"last step {last['step']}, data_wait {f(last.get('data_wait'), '.1%')}, sequences {last.get('sequences', '?')}{note}")
PYEOF
  grep -m2 -E "optimizer: |world [0-9]+ = dp" "$log" | sed -E 's/^[0-9:]+ [A-Z]+ [A-Za-z_.]+: /      /' | cut -c1-240 >>"$RESULTS"
  echo "      ($((SECONDS - t0)) s)" >>"$RESULTS"
  rm -rf "$dir"  # the checkpoint the trainer writes at the end (~5 GB for BERT-large)
}

run_case bf16_pad configs/zero2.json 1 1 --no-unpad
run_case bf16_tp1 configs/zero2.json 1 1
run_case bf16_pack configs/zero2.json 1 1 --pack_sequences
run_case fp16_tp1 configs/zero2_fp16.json 1 1
if [ "$NGPU" -ge 2 ]; then
  run_case bf16_tp2 configs/zero2.json 2 2
  run_case pack_tp2 configs/zero2.json 2 2 --pack_sequences
  run_case bf16_dp2 configs/zero2.json 2 1
  run_case pack_dp2 configs/zero2.json 2 1 --pack_sequences
fi
# the logs come back only up to 16 MiB each
for f in "$LOGS"/*.log; do
  [ "$(stat -c %s "$f")" -gt 8000000 ] && { tail -c 8000000 "$f" >"$f.tmp" && mv "$f.tmp" "$f"; }
done
echo "== results ($RESULTS)"
cat "$RESULTS"
