#!/usr/bin/env bash
# Exact resume, end to end: run a recipe once straight through, and once killed with SIGKILL in the
# middle of its training stage and rerun with the same command; print both runs' final metrics and
# whether the trained weights are bit-identical. Then time a rerun where every stage is reused.
# Usage: bash bench/kill_resume.sh [recipe] [kill after step] [python]   (from the repository root)
set -u
RECIPE=${1:-recipes/train_lenet300.yaml}
KILL_AT=${2:-600}
PYTHON=${3:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ARGS=(-o trainer.checkpoint.every_n_steps=100 -o trainer.threads=1)
NAME=$("$PYTHON" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$RECIPE")

"$PYTHON" -m runner run "$RECIPE" "${ARGS[@]}" -O "$WORK/straight" > "$WORK/straight.log" 2>&1 || { cat "$WORK/straight.log"; exit 1; }

"$PYTHON" -m runner run "$RECIPE" "${ARGS[@]}" -O "$WORK/killed" > "$WORK/killed.log" 2>&1 &
VICTIM=$!
until [ -f "$WORK/killed/$NAME/01-train/checkpoint/last.json" ] && \
      [ "$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$WORK/killed/$NAME/01-train/checkpoint/last.json" 2>/dev/null || echo 0)" -ge "$KILL_AT" ]; do
  kill -0 $VICTIM 2>/dev/null || { echo "the run ended before step $KILL_AT"; exit 1; }
  sleep 0.2
done
kill -9 $VICTIM; wait $VICTIM 2>/dev/null
echo "killed at: $(cat "$WORK/killed/$NAME/01-train/checkpoint/last.json" | tr -d '\n ')"

"$PYTHON" -m runner run "$RECIPE" "${ARGS[@]}" -O "$WORK/killed" > "$WORK/resumed.log" 2>&1 || { cat "$WORK/resumed.log"; exit 1; }
grep "resumes from" "$WORK/resumed.log"
START=$(date +%s.%N)
"$PYTHON" -m runner run "$RECIPE" "${ARGS[@]}" -O "$WORK/killed" > "$WORK/reused.log" 2>&1
echo "rerun with every stage reused: $(echo "$(date +%s.%N) - $START" | bc) s (process start, imports and all)"

"$PYTHON" - "$WORK/straight/$NAME" "$WORK/killed/$NAME" <<'PY'
import json, sys
from pathlib import Path
import torch
straight, resumed = Path(sys.argv[1]), Path(sys.argv[2])
for stage in sorted(p.name for p in straight.iterdir() if (p / "DONE").is_file()):
    a, b = (json.loads((run / stage / "metrics.json").read_text()) for run in (straight, resumed))
    keys = [k for k in ("val_loss", "val_acc", "test_loss", "test_acc", "test_error") if k in a]
    print(f"{stage}: straight " + ", ".join(f"{k} {a[k]}" for k in keys))
    print(f"{stage}: resumed  " + ", ".join(f"{k} {b[k]}" for k in keys))
    wa, wb = (torch.load(run / stage / "model.pt", weights_only=True) for run in (straight, resumed))
    print(f"{stage}: weights bit-identical: {all(torch.equal(wa[k], wb[k]) for k in wa)}")
PY
