#!/usr/bin/env bash
# Device check for accelerators and strategies: on a CUDA machine, run one short recipe
# (train -> prune -> finetune -> evaluate on synthetic data) on CPU, with ddp on 1 GPU, fsdp on
# 1 GPU and bf16-mixed on 1 GPU, and print each run's exit code, wall time and figures.
# Needs only what nnopt needs (torch, pytorch-lightning, pydantic, pyyaml, rich, numpy).
# Usage: bash bench/gpu_check.sh [python]      (from the repository root; ~1-2 minutes)
set -u
PYTHON=${1:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - <<'PY'
import torch, pytorch_lightning as pl
print(f"torch {torch.__version__}, lightning {pl.__version__}, cuda {torch.cuda.is_available()}",
      f"({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()})"
      if torch.cuda.is_available() else "")
PY

cat > "$WORK/recipe.yaml" <<'YAML'
name: gpu_check
seed: 0
model: {name: mlp, args: {hidden: [256, 128], in_features: 64}}
data: {name: synthetic, batch_size: 128, eval_batch_size: 1024,
       args: {shape: [64], num_train: 16384, num_val: 2048, num_test: 4096, noise: 2.0}}
trainer: {progress_bar: false, checkpoint: null}
stages:
  - {name: train, kind: train, epochs: 3, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}, schedule: {name: cosine}}
  - {name: prune, kind: prune, scope: global, sparsity: 0.8}
  - {name: finetune, kind: finetune, epochs: 1, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
  - {name: evaluate, kind: evaluate, latency_batch_sizes: [1, 256], latency_repeats: 10}
YAML

run() {  # run LABEL OVERRIDES...
  local label=$1; shift
  local overrides=()
  for o in "$@"; do overrides+=(-o "$o"); done
  local start=$(date +%s.%N)
  "$PYTHON" -m runner run "$WORK/recipe.yaml" -O "$WORK/$label" "${overrides[@]}" > "$WORK/$label.log" 2>&1
  local code=$?
  local wall=$("$PYTHON" -c "print(round($(date +%s.%N) - $start, 1))")
  "$PYTHON" - "$WORK/$label/gpu_check" "$label" "$code" "$wall" <<'PY'
import json, sys
from pathlib import Path
run, label, code, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def metrics(stage):
    path = run / stage / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
train, finetune, evaluate = metrics("01-train"), metrics("03-finetune"), metrics("04-evaluate")
print(f"{label:<10} exit {code}  wall {wall:>6} s  train fit {train.get('fit_seconds')} s "
      f"({train.get('samples_per_second')} samples/s)  train val_acc {train.get('val_acc')}  "
      f"finetune val_acc {finetune.get('val_acc')}  sparsity {evaluate.get('sparsity')}  "
      f"test_acc {evaluate.get('test_acc')}  latency_ms_b256 {evaluate.get('latency_ms_b256')}")
PY
  if [ "$code" != 0 ]; then tail -n 25 "$WORK/$label.log"; fi
}

run cpu       trainer.accelerator=cpu
run ddp-1gpu  trainer.accelerator=gpu trainer.devices=1 trainer.strategy=ddp
run fsdp-1gpu trainer.accelerator=gpu trainer.devices=1 trainer.strategy=fsdp
run bf16-gpu  trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed
