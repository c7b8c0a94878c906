"""The data path and precision under nnopt's train stage: a torchvision ResNet-18 trained from an image folder
(workers decode and augment) against the same images pre-decoded in memory; the same folder grown 1x, 4x, 16x
(time per epoch, peak memory); bf16-mixed against fp32 on CPU."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench import train
from runner.data import Splits
from runner.data.batches import InMemoryData
from runner.data.build import build_data
from runner.data.make_image_folder import make_image_folder
from runner.models import build_model
from runner.recipe import Recipe

SPLITS = ("train", "val", "test")
RESNET = {"torchvision": "resnet18", "args": {"num_classes": 4}}  # make_image_folder draws 4 shapes


def image_recipe(root: Path, image_size: int, batch_size: int, workers: int | str, *, steps: int | None = None,
                 epochs: int | None = None, precision: str = "32-true") -> Recipe:
    """ResNet-18 on the image folder at `root`, augmented as the shipped resnet18 recipes are."""
    length = {"steps": steps} if steps is not None else {"epochs": epochs}
    return Recipe.model_validate({
        "name": "bench-images", "seed": train.SEED, "model": RESNET,
        "data": {"name": "image_folder", "batch_size": batch_size, "eval_batch_size": batch_size,
                 "args": {"root": str(root)}, "loader": {"workers": workers},
                 "transforms": {"train": [{"RandomCrop": {"size": image_size, "padding": 4}}, "RandomHorizontalFlip"]}},
        "trainer": {"progress_bar": False, "precision": precision},
        "stages": [{"name": "train", "kind": "train", **length, "allow_chance_accuracy": True,
                    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
                    "schedule": {"name": "cosine"}}],
    })


def pre_decoded(data, recipe: Recipe) -> InMemoryData:
    """The streamed data set's images decoded once into tensors (no augmentation), batched as in-memory data is."""
    splits = Splits(*(data.examples(split, data.split_size(split)) for split in SPLITS), data.num_classes)
    return InMemoryData(splits, recipe.data.batch_size, recipe.data.eval_batch_size, recipe.data.limit, recipe.seed)


def fresh_model(recipe: Recipe) -> torch.nn.Module:
    torch.manual_seed(train.SEED)
    return build_model(recipe.model)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in fp32 eval mode: how the trained weights classify, whatever precision trained them."""
    model.eval()
    with torch.no_grad():
        right = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                    for i in range(0, len(labels), batch_size))
    return right / len(labels)


def make_folder(root: Path, per_class: int, image_size: int) -> Path:
    if not (root / "train").is_dir():
        make_image_folder(root, per_class=per_class, size=image_size)
    return root


def streaming_tasks(root: Path, image_size: int, batch_size: int, steps: int, workers: int | str) -> dict:
    """Two timed tasks on the same images and batch: streamed through workers, and pre-decoded in memory."""
    recipe = image_recipe(root, image_size, batch_size, workers, steps=steps)
    streamed = build_data(recipe.data, recipe.seed)
    in_memory = pre_decoded(streamed, recipe)
    return {"image_folder": lambda: train.run_stage(recipe, fresh_model(recipe), streamed)[0],
            "pre_decoded": lambda: train.run_stage(recipe, fresh_model(recipe), in_memory)[0]}


def bf16_tasks(mnist, root: Path, image_size: int, batch_size: int, steps: dict[str, int]) -> tuple[dict, dict]:
    """fp32 and bf16-mixed on LeNet-5 (MNIST) and ResNet-18 (the image folder, pre-decoded so only compute is
    timed); each task records the trained model's test accuracy in `accuracies`."""
    tasks, accuracies = {}, {}
    folder_recipe = image_recipe(root, image_size, batch_size, 0, steps=steps["resnet18"])
    images = pre_decoded(build_data(folder_recipe.data, folder_recipe.seed), folder_recipe)
    for precision in ("32-true", "bf16-mixed"):
        lenet = train.nnopt_recipe("lenet5", steps["lenet5"], mnist.batch_size)
        lenet = lenet.model_copy(update={"trainer": lenet.trainer.model_copy(update={"precision": precision})})
        resnet = image_recipe(root, image_size, batch_size, 0, steps=steps["resnet18"], precision=precision)
        for name, recipe, data in (("lenet5", lenet, mnist), ("resnet18", resnet, images)):
            key = f"{name}|{precision}"

            def task(recipe=recipe, data=data, key=key):
                clock, model, _ = train.run_stage(recipe, fresh_model(recipe), data)
                accuracies.setdefault(key, []).append(round(accuracy(model, *data.test), 4))
                return clock

            tasks[key] = task
    return tasks, accuracies


def _memory_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: resident now; VmHWM: its peak) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


def scale_one(root: Path, image_size: int, batch_size: int, workers: int | str) -> dict:
    """One epoch from the folder at `root` in this process: the fit's seconds; this process's resident memory
    before the data and model are built and its peak from then to the end of the epoch (the peak is reset first,
    so imports do not mask it; Linux only), and the peak of its largest loader worker."""
    recipe = image_recipe(root, image_size, batch_size, workers, epochs=1)
    before = _memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident size (VmHWM) to the current one
    data = build_data(recipe.data, recipe.seed)
    _, _, metrics = train.run_stage(recipe, fresh_model(recipe), data)
    kib = 1024  # Linux reports ru_maxrss in KiB
    return {"train_images": data.split_size("train"), "epoch_seconds": metrics["fit_seconds"],
            "samples_per_second": metrics["samples_per_second"], "rss_before_mb": before,
            "peak_rss_mb": _memory_mb("VmHWM"),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20, 1)}


def bench_scale(folder: Path, factors: list[int], per_class: int, image_size: int, batch_size: int,
                workers: int | str, threads: int) -> dict:
    """The folder grown by each factor (more images per class, same size), one fresh process per size."""
    out = {}
    for factor in factors:
        root = make_folder(folder / f"x{factor}", per_class * factor, image_size)
        print(f"scale {factor}x: one epoch from {root}", flush=True)
        command = [sys.executable, "-m", "bench.streaming", "--root", str(root), "--image-size", str(image_size),
                   "--batch-size", str(batch_size), "--workers", str(workers), "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"the {factor}x scale run failed:\n{done.stderr[-2000:]}")
        out[f"{factor}x"] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    """One scale point in this process (bench_scale's subprocess); prints its figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=scale_one.__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    print(json.dumps(scale_one(args.root, args.image_size, args.batch_size, workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

