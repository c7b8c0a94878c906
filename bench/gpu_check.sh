#!/usr/bin/env bash
# Device check for accelerators and strategies: one short recipe (train -> prune -> finetune -> evaluate on
# synthetic data) on CPU, with ddp on 1 GPU, fsdp on 1 GPU and bf16-mixed on 1 GPU. Each run is checked, not
# just printed: it exits 0; every fit trained on the device, strategy and dtype its label asks for (a callback
# records them in the first step, so a silent fallback to CPU or to float32 fails); the prune kept 80% of the
# weights at zero through fine-tuning; training learned; and a GPU run's test accuracy is within a tolerance of
# the CPU run's from the same invocation. Exits 1 when any check fails (each failure says which and why),
# 2 on a usage error. Needs only what nnopt needs.
#
# Usage (from the repository root; ~1-2 minutes on a GPU machine):
#   bash bench/gpu_check.sh [--python PY] [--only LABEL[,LABEL...]] [-o KEY=VALUE ...]
# LABELs: cpu ddp-1gpu fsdp-1gpu bf16-gpu (default: all). Each -o goes to every run after the label's own
# settings, so `--only bf16-gpu -o trainer.accelerator=cpu` shows the device check failing on a machine without
# a GPU (tests/test_gpu_check.py does).
set -u
PYTHON=python
LABELS="cpu ddp-1gpu fsdp-1gpu bf16-gpu"
ONLY=""
EXTRA=()
usage() { echo "gpu_check: $1" >&2; echo "usage: bash bench/gpu_check.sh [--python PY] [--only LABEL[,LABEL...]] [-o KEY=VALUE ...]; labels: $LABELS" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --python) [ $# -ge 2 ] || usage "--python needs a value"; PYTHON=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || usage "--only needs a value"; ONLY=${2//,/ }; shift 2 ;;
    -o) [ $# -ge 2 ] || usage "-o needs KEY=VALUE"; EXTRA+=(-o "$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument \`$1\`" ;;
  esac
done
for label in $ONLY; do
  case " $LABELS " in *" $label "*) ;; *) usage "unknown label \`$label\`" ;; esac
done
SELECTED=${ONLY:-$LABELS}
command -v "$PYTHON" > /dev/null || usage "no python \`$PYTHON\`"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - <<'PY'
from importlib.metadata import version
import torch
print(f"torch {torch.__version__}, lightning {version('pytorch_lightning')}, cuda {torch.cuda.is_available()}",
      f"({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()})"
      if torch.cuda.is_available() else "(the GPU runs will fail: no CUDA device)")
PY

# Imported by the recipe (trainer.callbacks resolves `import:` from the recipe's folder).
cat > "$WORK/device_probe.py" <<'PY'
import json
from pathlib import Path

import pytorch_lightning as pl
import torch


class RecordDevice(pl.Callback):
    """Writes device_probe.json in the stage folder: where and in which dtype the first training step computed."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0 and not hasattr(self, "hook"):
            first = next(m for m in pl_module.modules() if isinstance(m, torch.nn.Linear))
            self.hook = first.register_forward_hook(lambda module, inputs, output: self._record(trainer, output))

    def _record(self, trainer, output):
        self.hook.remove()
        record = {"device": output.device.type, "dtype": str(output.dtype).removeprefix("torch."),
                  "strategy": type(trainer.strategy).__name__}
        (Path(trainer.default_root_dir) / "device_probe.json").write_text(json.dumps(record))
PY

cat > "$WORK/recipe.yaml" <<'YAML'
name: gpu_check
seed: 0
model: {name: mlp, args: {hidden: [256, 128], in_features: 64}}
data: {name: synthetic, batch_size: 128, eval_batch_size: 1024,
       args: {shape: [64], num_train: 16384, num_val: 2048, num_test: 4096, noise: 2.0}}
trainer: {progress_bar: false, checkpoint: null, callbacks: [{import: "device_probe:RecordDevice"}]}
stages:
  - {name: train, kind: train, epochs: 3, optimizer: {name: sgd, lr: 0.05, momentum: 0.9}, schedule: {name: cosine}}
  - {name: prune, kind: prune, scope: global, sparsity: 0.8}
  - {name: finetune, kind: finetune, epochs: 1, optimizer: {name: sgd, lr: 0.01, momentum: 0.9}}
  - {name: evaluate, kind: evaluate, latency_batch_sizes: [1, 256], latency_repeats: 10}
YAML

settings() {  # the label's own overrides
  case $1 in
    cpu) echo "trainer.accelerator=cpu" ;;
    ddp-1gpu) echo "trainer.accelerator=gpu trainer.devices=1 trainer.strategy=ddp" ;;
    fsdp-1gpu) echo "trainer.accelerator=gpu trainer.devices=1 trainer.strategy=fsdp" ;;
    bf16-gpu) echo "trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed" ;;
  esac
}

FAILED=0
for label in $SELECTED; do
  overrides=()
  for o in $(settings "$label"); do overrides+=(-o "$o"); done
  start=$(date +%s.%N)
  "$PYTHON" -m runner run "$WORK/recipe.yaml" -O "$WORK/$label" "${overrides[@]}" "${EXTRA[@]}" > "$WORK/$label.log" 2>&1
  code=$?
  wall=$("$PYTHON" -c "print(round($(date +%s.%N) - $start, 1))")
  if ! "$PYTHON" - "$WORK" "$label" "$code" "$wall" <<'PY'
import json, sys
from pathlib import Path

work, label, code, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
# What each label must train on: (device, strategy, dtype of the first layer's output in a training step).
EXPECTED = {"cpu": ("cpu", "SingleDeviceStrategy", "float32"), "ddp-1gpu": ("cuda", "DDPStrategy", "float32"),
            "fsdp-1gpu": ("cuda", "FSDPStrategy", "float32"), "bf16-gpu": ("cuda", "SingleDeviceStrategy", "bfloat16")}
# A GPU run's test accuracy against the CPU run's (4096 test images: one standard error is about 0.7 point).
TOLERANCE = {"ddp-1gpu": 0.02, "fsdp-1gpu": 0.02, "bf16-gpu": 0.03}
SPARSITY = 0.8  # the recipe's prune


def read(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


run = work / label / "gpu_check"
train, prune, finetune, evaluate = (read(run / stage, "metrics.json")
                                    for stage in ("01-train", "02-prune", "03-finetune", "04-evaluate"))
print(f"{label:<10} exit {code}  wall {wall:>6} s  train fit {train.get('fit_seconds')} s "
      f"({train.get('samples_per_second')} samples/s)  train val_acc {train.get('val_acc')}  "
      f"finetune val_acc {finetune.get('val_acc')}  sparsity {evaluate.get('sparsity')}  "
      f"test_acc {evaluate.get('test_acc')}  latency_ms_b256 {evaluate.get('latency_ms_b256')}")
failures = []
if code != 0:
    failures.append(f"nnopt exited {code} (its output ends below)")
else:
    for stage in ("01-train", "03-finetune"):
        seen = read(run / stage, "device_probe.json")
        got = (seen.get("device"), seen.get("strategy"), seen.get("dtype"))
        if got != EXPECTED[label]:
            failures.append(f"{stage} trained on {got[0]} with {got[1]} in {got[2]}, expected "
                            f"{' with '.join(EXPECTED[label][:2])} in {EXPECTED[label][2]}")
    if abs(prune.get("sparsity_after", -1) - SPARSITY) > 1e-3:
        failures.append(f"prune left {prune.get('sparsity_after')} of the weights at zero, expected {SPARSITY}")
    if evaluate.get("params_nonzero", 0) > prune.get("params_nonzero", -1):
        failures.append(f"fine-tuning brought pruned weights back: {prune.get('params_nonzero')} nonzero after the "
                        f"prune, {evaluate.get('params_nonzero')} at evaluation")
    if not train.get("val_acc", 0) > 0.5:  # 10 classes: chance is 0.1
        failures.append(f"training did not learn: val_acc {train.get('val_acc')} (at most 0.5)")
    reference = read(work / "cpu" / "gpu_check" / "04-evaluate", "metrics.json").get("test_acc")
    if label in TOLERANCE and reference is not None:
        if abs(evaluate["test_acc"] - reference) > TOLERANCE[label]:
            failures.append(f"test_acc {evaluate['test_acc']:.4f} differs from the CPU run's {reference:.4f} by more "
                            f"than {TOLERANCE[label]}")
    elif label in TOLERANCE:
        print(f"{label:<10} no CPU run in this invocation: agreement with CPU not checked")
for failure in failures:
    print(f"FAIL {label}: {failure}")
if not failures:
    print(f"PASS {label}")
sys.exit(1 if failures else 0)
PY
  then
    FAILED=$((FAILED + 1))
    if [ "$code" != 0 ]; then tail -n 25 "$WORK/$label.log"; fi
  fi
done

count=$(echo $SELECTED | wc -w)
if [ "$FAILED" -gt 0 ]; then
  echo "gpu_check: $FAILED of $count runs FAILED" >&2
  exit 1
fi
echo "gpu_check: all $count runs passed"
