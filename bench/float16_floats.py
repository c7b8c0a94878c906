"""What `floats: float16` saves on a weight-shared model: packed bytes per stream and test error, float32 vs float16
codebooks and biases, on the fine-tuned pruned model of a run (no centroid fine-tuning here, so only the rounding differs).

Usage: python -m bench.float16_floats STAGE_FOLDER [--bits 6]
e.g. after `nnopt run recipes/han2015_lenet300.yaml`: python -m bench.float16_floats outputs/han2015_lenet300/03-finetune
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from runner.compress import packed, sharing
from runner.data.mnist import mnist
from runner.files import read_json
from runner.modelio import load_model
from runner.models.weights import STAGE_STRUCTURE


def _error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) != labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_folder")
    parser.add_argument("--bits", type=int, default=6)
    args = parser.parse_args()
    model = load_model(args.stage_folder).eval()
    model_spec = read_json(Path(args.stage_folder) / STAGE_STRUCTURE)["model"]
    images, labels = mnist().test
    shared, _ = sharing.share_weights(model, args.bits, 50)
    rows = [("float32", _error(shared, images, labels), packed.pack(shared, model_spec))]
    sharing.round_floats_to_float16(shared)
    rows.append(("float16", _error(shared, images, labels), packed.pack(shared, model_spec)))
    print(f"pruned model: test error {_error(model, images, labels):.2%}; shared at {args.bits} bits:")
    for floats, error, result in rows:
        print(f"  floats {floats}: test error {error:.2%}, {len(result.data):,} bytes, streams {result.breakdown['streams']}")


if __name__ == "__main__":
    main()
