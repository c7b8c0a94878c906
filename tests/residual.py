"""Recipes for the residual-network tests: a short training on small synthetic images, then the stages under test."""

from __future__ import annotations

RESNET20 = {"name": "resnet20", "args": {"width": 8, "num_classes": 4}}  # 16x16 inputs: about 69K parameters


def residual_recipe(name: str, stages: list[dict], model: dict = RESNET20, shape: tuple[int, ...] = (3, 16, 16),
                    train_epochs: int = 3) -> dict:
    data = {"name": "synthetic", "batch_size": 16,
            "args": {"shape": list(shape), "num_classes": 4, "num_train": 256, "num_val": 128, "num_test": 16,
                     "noise": 1.5}}
    train = [{"name": "train", "kind": "train", "epochs": train_epochs,
              "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}}] if train_epochs else []
    # One thread: on a shared two-core machine a second OpenMP thread spins and makes each step 30x slower.
    # No resume checkpoints: they are tests/test_resume's subject, and a ResNet-18's take seconds to write each epoch.
    return {"name": name, "seed": 0, "model": model, "data": data,
            "trainer": {"progress_bar": False, "threads": 1, "checkpoint": None}, "stages": [*train, *stages]}
