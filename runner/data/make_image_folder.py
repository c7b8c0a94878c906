"""Write a small image-folder data set (one class per shape, in varied colours, places and sizes) for
tests and examples: `python -m runner.data.make_image_folder DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
_HUES = ((255, 90, 60), (70, 230, 90), (80, 120, 255), (240, 220, 60))


def _draw(shape: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    background = rng.integers(0, 90, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    # Each class leans to its own hue, so a tiny model learns it within a few epochs; the shape tells the rest.
    hue = np.array(_HUES[SHAPES.index(shape)])
    colour = tuple(int(c) for c in np.clip(hue * rng.uniform(0.55, 1.0) + rng.integers(0, 70, 3), 0, 255))
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=colour)
    return image


def make_image_folder(root: str | Path, per_class: int = 40, size: int = 32, single: bool = False,
                      seed: int = 0) -> Path:
    """`root/{train,val,test}/<shape>/NNN.png` (val and test a quarter of train each), or with `single`,
    `root/<shape>/NNN.png` for nnopt to split; the same seed writes the same pixels."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"": per_class} if single else {"train": per_class, "val": max(1, per_class // 4),
                                             "test": max(1, per_class // 4)}
    for split, count in counts.items():
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _draw(shape, size, rng).save(folder / f"{i:03d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("root")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class (default 40)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--single", action="store_true", help="one folder per class, no train/val/test folders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_image_folder(args.root, args.per_class, args.size, args.single, args.seed))


if __name__ == "__main__":
    main()
