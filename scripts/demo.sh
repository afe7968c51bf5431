#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU:
#   1. data prep of the bundled Wikipedia extracts (10,033 documents) with an 8,192-piece WordPiece
#      vocabulary trained on them, 5 NSP pairings per document
#   2. pretraining of the tiny BERT (configs/cpu_recipe.json, shortened) with DeepSpeed ZeRO-2 on 2 CPU
#      processes (gloo)
#   3. export of the checkpoint to the HF BertForPreTraining layout
#   4. fine-tuning on sentence polarity (Pang & Lee) and cloze QA: the pretrained model next to the same
#      model from random init (benchmarks/pretraining_value.py; the full comparison is in README.md)
# Everything lands under $OUT (default demo_out/). Override the length with DEMO_STEPS (the full
# recipe, configs/cpu_recipe.json, is 1500 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-demo_out}
STEPS=${DEMO_STEPS:-600}
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"

# The demo starts over: an earlier demo's outputs (another vocabulary, another recipe) would be resumed.
rm -rf "$OUT/data" "$OUT/run" "$OUT/hf" "$OUT/finetune"

echo "== 1/4 data prep (embedded corpus) =="
$PY -m data_prep --embedded --train-wordpiece-vocab-size 8192 --dupe-factor 5 --output-dir "$OUT/data" \
  --seq-length 128 --workers 2

echo "== 2/4 pretraining: tiny BERT, ZeRO-2, 2 CPU processes =="
# --log_level error: the launcher's own INFO lines (hostfile, spawned commands) are not the product's.
# configs/cpu_recipe.json: bert-tiny with the 8k vocabulary, 40% masking, lr 2e-3 (docs/pretrain.md says why).
deepspeed --log_level error --num_gpus 2 --master_port "${MASTER_PORT:-29731}" pretrain/run.py \
  --config configs/cpu_recipe.json --data "$OUT/data" --train_steps "$STEPS" --save_dir "$OUT/run" \
  --eval_interval "$(( STEPS / 3 > 0 ? STEPS / 3 : 1 ))" --save_interval "$STEPS"
grep '"kind": "eval"' "$OUT/run/metrics.jsonl" | tail -1 | $PY -c 'import json, sys
r = json.loads(sys.stdin.read())
print(f"held-out MLM accuracy {r['"'"'mlm_acc'"'"']:.3f} (unigram-frequency baseline {r['"'"'unigram_acc'"'"']:.3f}), NSP accuracy {r['"'"'nsp_acc'"'"']:.3f}")'

echo "== 3/4 export to HF layout =="
$PY -m pretrain.export_hf "$OUT/run/latest" "$OUT/hf"

echo "== 4/4 fine-tuning: pretrained vs the same model from random init =="
# One process: all its cores (OMP_NUM_THREADS=1 was for the 2 ranks). The random-init twin is the
# run's own step-0 model (its seed read from the checkpoint; the export of step 3 is reused). 2 seeds each, lr 1e-3
# (the full sweep: benchmarks/pretraining_value.py).
$PY benchmarks/pretraining_value.py --run "$OUT/run" --pretrained "$OUT/hf" --output-dir "$OUT/finetune" \
  --tasks pang-lee wiki-cloze --seeds 1 2 --lrs 1e-3 --threads "$(env -u OMP_NUM_THREADS nproc)" --table-only
echo "outputs: $OUT/data, $OUT/run (checkpoints, metrics.jsonl, loss_curves.png), $OUT/hf, $OUT/finetune"
