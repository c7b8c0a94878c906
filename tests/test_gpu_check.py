"""bench/gpu_check.sh fails when a check fails: shown on CPU by sending its GPU runs to the CPU (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small enough for seconds of training; every -o goes to every run after the label's own settings.
TINY = ["-o", "data.args.num_train=1024", "-o", "data.args.num_val=512", "-o", "data.args.num_test=512",
        "-o", "stages.train.epochs=2", "-o", "stages.evaluate.latency_batch_sizes=[1]",
        "-o", "stages.evaluate.latency_repeats=3"]


def gpu_check(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--python", sys.executable, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--only", "cpu,tpu"], "unknown label `tpu`"),
    (["--fast"], "unknown argument `--fast`"),
    (["-o"], "-o needs KEY=VALUE"),
])
def test_usage_errors_exit_2_before_running_anything(args, message):
    result = gpu_check(*args, timeout=30)
    assert result.returncode == 2 and message in result.stderr and "usage:" in result.stderr
    assert result.stdout == ""


def test_the_cpu_run_passes_and_a_gpu_run_sent_to_the_cpu_fails_held_against_it():
    """bf16-gpu sent to the CPU trains fine, in bfloat16, and still fails: it did not train on CUDA. Its
    accuracy is held against the CPU run of the same invocation, which passes. (One invocation for both: each
    run is a fresh process.)"""
    result = gpu_check("--only", "cpu,bf16-gpu", "-o", "trainer.accelerator=cpu", *TINY)
    out = result.stdout
    assert result.returncode == 1 and "gpu_check: 1 of 2 runs FAILED" in result.stderr, out + result.stderr
    assert "PASS cpu" in out and "FAIL cpu" not in out
    assert "bf16-gpu   exit 0" in out  # nnopt itself succeeded ...
    assert ("FAIL bf16-gpu: 01-train trained on cpu with SingleDeviceStrategy in bfloat16, expected cuda with "
            "SingleDeviceStrategy in bfloat16") in out  # ... the device check did not
    failures = [line for line in out.splitlines() if line.startswith("FAIL bf16-gpu")]
    # the same figures on the same CPU: only the device is wrong, and the agreement check ran
    assert len(failures) == 2 and all("trained on cpu" in line for line in failures), out
    assert "not checked" not in out
