#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   1. data prep of the bundled Wikipedia extracts (10,033 documents) with the bert-base-uncased vocab
#   2. pretraining of the tiny BERT with DeepSpeed ZeRO-2 on 2 CPU processes (gloo)
#   3. export of the checkpoint to the HF BertForPreTraining layout
#   4. fine-tuning the exported model on sentence polarity (Pang & Lee) and its accuracy
# Everything lands under $OUT (default demo_out/). Override the length with DEMO_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-demo_out}
STEPS=${DEMO_STEPS:-600}
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"

echo "== 1/4 data prep (embedded corpus) =="
$PY -m data_prep --embedded --output-dir "$OUT/data" --seq-length 128 --workers 2

echo "== 2/4 pretraining: tiny BERT, ZeRO-2, 2 CPU processes =="
# --log_level error: the launcher's own INFO lines (hostfile, spawned commands) are not the product's.
deepspeed --log_level error --num_gpus 2 --master_port "${MASTER_PORT:-29731}" pretrain/run.py \
  --ds_config configs/zero2.json --model_config configs/bert-tiny.json \
  --data "$OUT/data" --seq_length 128 --train_steps "$STEPS" --save_dir "$OUT/run" \
  --lr 2e-3 --warmup_proportion 0.1 --eval_interval "$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))" --eval_samples 1024
# zero2.json's lr suits BERT-large; the tiny model learns in minutes only with a larger one.
grep '"kind": "eval"' "$OUT/run/metrics.jsonl" | tail -1 | $PY -c 'import json, sys
r = json.loads(sys.stdin.read())
print(f"held-out MLM accuracy {r['"'"'mlm_acc'"'"']:.3f} (unigram-frequency baseline {r['"'"'unigram_acc'"'"']:.3f}), NSP accuracy {r['"'"'nsp_acc'"'"']:.3f}")'

echo "== 3/4 export to HF layout =="
$PY -m pretrain.export_hf "$OUT/run/latest" "$OUT/hf"

echo "== 4/4 fine-tuning on sentence polarity =="
# A 4M-parameter model fine-tunes best at a higher learning rate than BERT-base's 5e-5.
$PY -m finetune --task classify --model "$OUT/hf" --dataset pang-lee --output-dir "$OUT/finetune" \
  --learning-rate 5e-4 --threads "$(env -u OMP_NUM_THREADS nproc)" >/dev/null  # one process: all its cores (OMP_NUM_THREADS=1 was for the 2 ranks)
$PY -c 'import json, sys
m = json.load(open(sys.argv[1]))["mean"]
print(f"sentence polarity (Pang & Lee, 3,000/1,000 split): accuracy {m['"'"'accuracy'"'"']:.3f}, Matthews {m['"'"'matthews'"'"']:.3f}")
print(f"outputs: {sys.argv[2]}/data, {sys.argv[2]}/run (checkpoints, metrics.jsonl, loss_curves.png), {sys.argv[2]}/hf, {sys.argv[2]}/finetune")' \
  "$OUT/finetune/metrics.json" "$OUT"
