"""Data sources beyond in-memory tensors: image folders, torchvision data sets by name, `import:` factories,
per-split transforms, loader settings, rank sharding and exact resume on the streaming path."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from runner.data import DATASETS
from runner.data.build import build_data
from runner.data.make_image_folder import SHAPES, make_image_folder
from runner.data.streaming import StreamingBatches, augmentation_seed
from runner.recipe import load_recipe
from tests.conftest import building_folder, kill_at_step, read_metrics, run_straight_and_resumed, untimed_metrics
from tests.test_validation import assert_clean_error


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 classes of coloured shapes, 16x16: 40 training, 10 validation and 10 test images per class."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", per_class=40, size=16)


def shapes_recipe(root, epochs: int = 4, **data) -> dict:
    train = {"name": "train", "kind": "train", "epochs": epochs, "optimizer": {"name": "adam", "lr": 0.003}}
    evaluate = {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 3,
                "latency_warmup": 0}
    return {"name": "shapes", "seed": 0,
            "model": {"name": "lenet5", "args": {"in_channels": 3, "num_classes": 4, "image_size": 16}},
            "data": {"name": "image_folder", "args": {"root": str(root)}, "batch_size": 16, "eval_batch_size": 40,
                     **data},
            "trainer": {"progress_bar": False}, "stages": [train, evaluate]}


def data_of(write_recipe, recipe: dict, seed: int = 0):
    return build_data(load_recipe(write_recipe(recipe)).data, seed)


def batches(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [x for x, _ in loader]


def test_an_image_folder_trains_above_chance_with_augmentation(nnopt, write_recipe, tmp_path, shapes):
    augment = {"train": [{"RandomCrop": {"size": 16, "padding": 2}}, "RandomHorizontalFlip"]}
    path = write_recipe(shapes_recipe("shapes", transforms=augment, loader={"workers": 1}))
    (tmp_path / "shapes").symlink_to(shapes)  # a relative root is relative to the recipe file, not the cwd
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert code == 0, err
    assert read_metrics(tmp_path / "out" / "shapes", "02-evaluate")["test_acc"] > 0.8  # chance is 0.25
    # Loader settings cannot change a result (augmentation is seeded per example), so they rerun nothing.
    code, out, _ = nnopt("run", path, "-O", tmp_path / "out", "-o", "data.loader.workers=0")
    assert code == 0 and "reuse train (train)" in out and "reuse evaluate (evaluate)" in out, out


def test_image_folder_splits_and_probes(write_recipe, shapes):
    data = data_of(write_recipe, shapes_recipe(shapes))
    assert data.num_classes == 4 and data.input_shape == (3, 16, 16)
    assert [data.split_size(split) for split in ("train", "val", "test")] == [160, 40, 40]
    x, y = data.examples("test", 12)
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert len(set(y.tolist())) >= 3  # a fixed shuffle: the first examples are not all of the first class


def test_a_changed_image_folder_changes_the_fingerprint_and_the_plan_says_why(write_recipe, tmp_path):
    from runner.plan import fingerprints
    from runner.provenance import changes, run_inputs

    root = make_image_folder(tmp_path / "few", per_class=4, size=16)  # the size shapes_recipe's model takes
    path = write_recipe(shapes_recipe(root))
    recipe = load_recipe(path)
    before = fingerprints(recipe), run_inputs(recipe)
    assert run_inputs(recipe) == before[1]  # a walk of names, sizes and times: stable
    shutil.copy(root / "train" / "circle" / "000.png", root / "train" / "circle" / "extra.png")
    assert fingerprints(recipe) != before[0]
    assert changes(before[1], run_inputs(recipe)) == ["data files changed"]


def test_one_folder_is_split_per_class_by_a_seed(write_recipe, tmp_path):
    root = make_image_folder(tmp_path / "one", per_class=20, size=8, single=True)
    splits = [DATASETS.get("image_folder")(str(root), val_fraction=0.25, test_fraction=0.1, split_seed=seed)
              for seed in (0, 0, 1)]
    files = [{split: {path for path, _ in getattr(s, split).samples} for split in ("train", "val", "test")}
             for s in splits]
    assert [len(files[0][split]) for split in ("train", "val", "test")] == [4 * 13, 4 * 5, 4 * 2]
    assert not (files[0]["train"] & files[0]["val"]) and not (files[0]["val"] & files[0]["test"])
    for split in ("val", "test"):
        labels = [label for _, label in getattr(splits[0], split).samples]
        assert len(set(labels)) == 4 and len(set(labels.count(c) for c in range(4))) == 1  # stratified
    assert files[0] == files[1] and files[0]["val"] != files[2]["val"]


def write_idx(folder, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The MNIST file format torchvision reads: big-endian headers, then uint8 pixels or labels."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.squeeze(1) * 255).round().to(torch.uint8).numpy()
    (folder / f"{name}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, *pixels.shape) + pixels.tobytes())
    (folder / f"{name}-labels-idx1-ubyte").write_bytes(
        struct.pack(">ii", 2049, len(labels)) + labels.numpy().astype(np.uint8).tobytes())


def test_a_torchvision_data_set_by_name_reads_its_root_and_trains(nnopt, write_recipe, tmp_path):
    # torchvision's FashionMNIST reader, fed real MNIST digits written in that format.
    mnist = DATASETS.get("mnist")()
    raw = tmp_path / "fashion" / "FashionMNIST" / "raw"
    write_idx(raw, "train", mnist.train[0][:1200], mnist.train[1][:1200])
    write_idx(raw, "t10k", mnist.test[0][:300], mnist.test[1][:300])
    recipe = shapes_recipe(tmp_path / "fashion", epochs=2)
    recipe["model"] = {"name": "lenet_300_100"}
    recipe["data"] = {"name": "fashion_mnist", "args": {"root": "fashion", "val_size": 200}, "batch_size": 32,
                      "loader": {"workers": 0}}
    path = write_recipe(recipe)
    data = build_data(load_recipe(path).data, 0)
    assert [data.split_size(split) for split in ("train", "val", "test")] == [1000, 200, 300]
    x, y = data.examples("test", 5)
    distance = (mnist.test[0][:300] - x[0]).abs().flatten(1).amax(1)  # the probe is a test digit, pixel for pixel
    assert distance.min() <= 0.5 / 255 and mnist.test[1][int(distance.argmin())] == y[0]
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert code == 0, err
    assert read_metrics(tmp_path / "out" / "shapes", "02-evaluate")["test_acc"] > 0.7  # chance is 0.1


def test_a_missing_torchvision_root_names_the_files_expected_at_validate(nnopt, write_recipe, tmp_path):
    recipe = shapes_recipe("nowhere")
    recipe["data"] = {"name": "cifar10", "args": {"root": "nowhere"}}
    path = write_recipe(recipe)
    code, _, err = nnopt("validate", path)
    assert_clean_error(code, " ".join(err.split()), f"{path}:", "data.args.root: CIFAR10 root",
                       f"{tmp_path / 'nowhere'}` does not exist", f"{tmp_path / 'nowhere' / 'cifar-10-batches-py' / 'data_batch_1'}",
                       "nnopt never downloads")


DATASETS_MODULE = '''
import torch
from torch.utils.data import TensorDataset


def blobs(n_train: int, dim: int = 8, seed: int = 0):
    """Two Gaussian blobs: (train, val, test) TensorDatasets."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, dim, generator=generator) * 2

    def draw(n):
        labels = torch.randint(0, 2, (n,), generator=generator)
        return TensorDataset(centres[labels] + torch.randn(n, dim, generator=generator), labels)

    return draw(n_train), draw(100), draw(100)
'''

DATAMODULE_MODULE = '''
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from {datasets}


class Blobs(pl.LightningDataModule):
    def __init__(self, batch_size):
        super().__init__()
        self.batch_size, self.num_classes = batch_size, 2

    def setup(self, stage):
        self.train, self.val, self.test = blobs(400)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=50)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=50)


def make(batch_size: int = 32):
    return Blobs(batch_size)
'''


@pytest.mark.parametrize("returns", ["datasets", "datamodule"])
def test_an_import_factory_next_to_the_recipe_trains(nnopt, write_recipe, tmp_path, returns):
    # Module names unique to the test: one process imports them once.
    (tmp_path / f"blobs_{returns}.py").write_text(DATASETS_MODULE)
    if returns == "datasets":
        data = {"import": f"blobs_{returns}:blobs", "args": {"n_train": 400}, "batch_size": 32}
    else:
        (tmp_path / "blobs_module.py").write_text(DATAMODULE_MODULE.format(datasets=f"blobs_{returns} import blobs"))
        data = {"import": "blobs_module:make", "args": {"batch_size": 32}}
    recipe = shapes_recipe("unused", epochs=3)
    recipe["model"] = {"name": "mlp", "args": {"hidden": [16], "in_features": 8, "num_classes": 2}}
    recipe["data"] = data
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")  # the recipe's folder is not the cwd
    assert code == 0, err
    assert read_metrics(tmp_path / "out" / "shapes", "02-evaluate")["test_acc"] > 0.9  # chance is 0.5


def test_a_datamodule_with_recipe_loader_fields_is_refused(nnopt, write_recipe, tmp_path):
    (tmp_path / "blobs_refused.py").write_text(DATASETS_MODULE)
    (tmp_path / "blobs_refused_module.py").write_text(DATAMODULE_MODULE.format(datasets="blobs_refused import blobs"))
    recipe = shapes_recipe("unused")
    recipe["model"] = {"name": "mlp", "args": {"hidden": [16], "in_features": 8, "num_classes": 2}}
    recipe["data"] = {"import": "blobs_refused_module:make", "batch_size": 64, "transforms": {"train": ["RandomInvert"]}}
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 1 and "makes its own loaders: data.batch_size, data.transforms would be ignored" in " ".join(err.split())


def test_a_deterministic_eval_transform_changes_what_the_model_sees(write_recipe, shapes):
    plain = data_of(write_recipe, shapes_recipe(shapes))
    normalized = data_of(write_recipe, shapes_recipe(shapes, transforms={
        "eval": [{"Normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}]}))
    x, y = plain.examples("val", 8)
    xn, yn = normalized.examples("val", 8)
    assert torch.equal(y, yn) and torch.allclose(xn, (x - 0.5) / 0.25, atol=1e-6)
    # The training batches see the train list (empty here), not the eval one.
    first = next(iter(normalized.train_dataloader()))[0]
    assert 0 <= first.min() and first.max() <= 1


def test_random_transforms_differ_by_epoch_and_repeat_by_seed_whatever_the_workers(write_recipe, shapes):
    augment = {"train": [{"RandomResizedCrop": {"size": 16, "scale": [0.3, 1.0]}}, "RandomHorizontalFlip"]}
    runs = {(seed, workers): data_of(write_recipe, shapes_recipe(shapes, transforms=augment,
                                                                 loader={"workers": workers}), seed)
            for seed, workers in ((0, 0), (0, 2), (1, 0))}
    epochs = {key: [batches(data.train_dataloader(), epoch) for epoch in (0, 1)] for key, data in runs.items()}
    reference = epochs[(0, 0)]
    assert all(torch.equal(a, b) for a, b in zip(reference[0], epochs[(0, 2)][0]))  # workers change nothing
    assert all(torch.equal(a, b) for a, b in zip(reference[1], epochs[(0, 2)][1]))
    assert not torch.equal(reference[0][0], epochs[(1, 0)][0][0])  # another seed, other crops

    # One example: another crop in another epoch, the same crop whenever that epoch is drawn again.
    train = runs[(0, 0)]._train
    crops = [train[(5, augmentation_seed(0, epoch, 5))][0] for epoch in (0, 1, 0)]
    assert not torch.equal(crops[0], crops[1]) and torch.equal(crops[0], crops[2])


def test_ranks_batch_i_together_is_the_one_process_batch_i_augmented_alike(write_recipe, shapes):
    data = data_of(write_recipe, shapes_recipe(shapes, transforms={"train": [{"RandomCrop": {"size": 16, "padding": 3}}]},
                                               loader={"workers": 0}))
    whole = StreamingBatches(data._train, 16, shuffle=True, seed=0)
    ranks = [StreamingBatches(data._train, 16, shuffle=True, seed=0, rank=r, world_size=2) for r in (0, 1)]
    single = [(x, y) for x, y in whole]
    per_rank = [[(x, y) for x, y in rank] for rank in ranks]
    assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 10 and len(per_rank[0][0][0]) == 8
    for i, (x, y) in enumerate(single):
        together = torch.cat([per_rank[0][i][0], per_rank[1][i][0]])
        key = lambda images: sorted(images.flatten(1).sum(1).tolist())  # noqa: E731
        assert key(together) == pytest.approx(key(x), abs=1e-5)  # the same examples, cropped the same way


def test_resume_mid_epoch_skips_exactly_what_was_trained(write_recipe, shapes):
    data = data_of(write_recipe, shapes_recipe(shapes, loader={"workers": 2}))
    loader = data.train_dataloader()
    loader.sampler.set_epoch(1)
    straight = [y for _, y in loader]
    served = iter(loader)
    [next(served) for _ in range(3)]
    state = loader.state_dict()
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    rest = [y for _, y in resumed]
    assert state == {"epoch": 1, "served": 3} and len(rest) == len(straight) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[3:]))


def streaming_recipe(root, epochs: int = 2) -> dict:
    recipe = shapes_recipe(root, epochs=epochs, transforms={"train": [{"RandomCrop": {"size": 16, "padding": 2}},
                                                                      "RandomHorizontalFlip"]},
                           loader={"workers": 2})
    recipe["trainer"]["checkpoint"] = {"every_n_steps": 4}  # and at the end of each epoch of 10 batches
    recipe["stages"][0]["schedule"] = {"name": "cosine"}
    return recipe


def test_an_interrupted_streaming_fit_resumes_bit_identical(nnopt, write_recipe, tmp_path, monkeypatch, shapes):
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(streaming_recipe(shapes)), tmp_path,
                                   checkpoints=4)  # step 12: mid-epoch 1
    assert run.saved_before == [4, 8, 10, 12] and "resumes from its last checkpoint at step 12" in run.out, run.err
    assert_same_run(run.straight, run.resumed)


def assert_same_run(straight, resumed) -> None:
    for folder in ("01-train", "02-evaluate"):
        assert untimed_metrics(resumed, folder) == untimed_metrics(straight, folder)
    weights = torch.load(resumed / "01-train" / "model.pt", weights_only=True)
    reference = torch.load(straight / "01-train" / "model.pt", weights_only=True)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sigkill_of_a_streaming_fit_then_rerun_matches_an_uninterrupted_run(write_recipe, tmp_path, shapes):
    path = write_recipe(streaming_recipe(shapes, epochs=3))

    def nnopt_process(out_dir):
        return subprocess.Popen([sys.executable, "-m", "runner", "run", str(path), "-O", str(out_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight = nnopt_process(tmp_path / "straight")
    victim = nnopt_process(tmp_path / "killed")
    position = building_folder(tmp_path / "killed" / "shapes", path) / "checkpoint" / "last.json"
    kill_at_step(victim, position, 12)  # into the second epoch
    resumed = nnopt_process(tmp_path / "killed")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0 and "train (train): unfinished: resumes from its last checkpoint at step" in out, out
    assert straight.wait() == 0, straight.stdout.read()
    assert_same_run(tmp_path / "straight" / "shapes", tmp_path / "killed" / "shapes")


def layout_problem(tmp_path, case: str):
    """A broken image folder (or recipe data block) for each error `validate` must locate."""
    root = tmp_path / "broken"
    args: dict = {"root": str(root)}
    if case == "file":
        root.write_text("not a folder")
    elif case == "no class folders":
        root.mkdir()
        (root / "a.png").write_bytes(b"")
    elif case in ("classes differ", "empty class", "fraction and folder"):
        make_image_folder(root, per_class=4, size=8)
        if case == "classes differ":
            for image in (root / "val" / SHAPES[1]).iterdir():
                image.unlink()
            (root / "val" / SHAPES[1]).rmdir()
        elif case == "empty class":
            for image in (root / "test" / SHAPES[2]).iterdir():
                image.unlink()
        else:
            args["val_fraction"] = 0.2
    elif case == "empty split":
        make_image_folder(root, per_class=4, size=8, single=True)
        args.update(val_fraction=0.25, test_fraction=0.05)
    return args


@pytest.mark.parametrize("case, field, message", [
    ("missing", "data.args.root", "data root `{root}` does not exist"),
    ("file", "data.args.root", "data root `{root}` is a file, not a folder"),
    ("no class folders", "data.args.root", "`{root}` holds no class folders (found: a.png)"),
    ("classes differ", "data.args.root", "the splits have different classes: `{root}/val` lacks `square`"),
    ("empty class", "data.args.root", "class folder `{root}/test/triangle` holds no images"),
    ("empty split", "data.args.test_fraction", "the test split of `{root}` is empty"),
    ("fraction and folder", "data.args.val_fraction", "`{root}/val` exists and `val_fraction` would carve another"),
])
def test_image_folder_layout_errors_are_located_at_validate(nnopt, write_recipe, tmp_path, case, field, message):
    args = layout_problem(tmp_path, case)
    path = write_recipe(shapes_recipe("x") | {"data": {"name": "image_folder", "args": args}})
    code, _, err = nnopt("validate", path)
    assert_clean_error(code, " ".join(err.split()), f"{path}:", f"{field}: " + message.format(root=tmp_path / "broken"))


@pytest.mark.parametrize("data, field, message, hint", [
    ({"transforms": {"train": ["RandomHorizontalFlp"]}}, "data.transforms.train[0]",
     "unknown transform `RandomHorizontalFlp`", "did you mean `RandomHorizontalFlip`?"),
    ({"transforms": {"train": [{"RandomCrop": {"size": 16, "paddin": 2}}]}}, "data.transforms.train[0].RandomCrop.paddin",
     "RandomCrop has no argument `paddin`", "did you mean `padding`?"),
    ({"transforms": {"eval": [{"Resize": {}}]}}, "data.transforms.eval[0].Resize", "Resize needs `size`", "{Resize: {size:"),
    ({"transforms": {"eval": [{"ToDtype": {"dtype": "float33"}}]}}, "data.transforms.eval[0].ToDtype.dtype",
     "`float33` is not a torch dtype", "float32"),
    ({"transforms": {"train": ["RandomInvert", {"RandomRotation": {"degrees": -5}}]}},
     "data.transforms.train[1].RandomRotation", "RandomRotation: If degrees is a single number, it must be positive", None),
    ({"loader": {"workers": 0, "prefetch_factor": 4}}, "data.loader", "`prefetch_factor` needs workers", None),
    ({"name": None, "import": "no_such_module:make"}, "data.import", "cannot import `no_such_module`",
     "the module must be next to the recipe"),
])
def test_transform_loader_and_import_errors_are_located_at_validate(nnopt, write_recipe, shapes, data, field,
                                                                     message, hint):
    recipe = shapes_recipe(shapes)
    recipe["data"] = {key: value for key, value in (recipe["data"] | data).items() if value is not None}
    path = write_recipe(recipe)
    code, _, err = nnopt("validate", path)
    assert_clean_error(code, " ".join(err.split()), f"{path}:", f"{field}: {message}", *([hint] if hint else []))


@pytest.mark.slow
def test_two_process_ddp_on_an_image_folder_equals_one_process(nnopt, write_recipe, tmp_path, shapes):
    from tests.test_distributed import assert_same_metrics, run_cli

    recipe = shapes_recipe(shapes, epochs=2, transforms={"train": [{"RandomCrop": {"size": 16, "padding": 2}}]},
                           loader={"workers": 1})
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path / "one")
    assert code == 0, err
    run_cli("run", path, "-O", tmp_path / "two", "-o", "trainer.strategy=ddp", "-o", "trainer.devices=2")
    one, two = read_metrics(tmp_path / "one" / "shapes", "01-train"), read_metrics(tmp_path / "two" / "shapes", "01-train")
    assert two["steps"] == one["steps"] == 20  # the global batch of 16: 8 examples per process and step
    assert_same_metrics(one, two, ["train_loss", "val_loss", "val_acc"])
