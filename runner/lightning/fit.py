"""`fit`: tune (if asked) and train a ClassifierModule with Lightning; the shared body of every stage that trains."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from pathlib import Path

import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.tuner import Tuner

from runner.artifacts import CHECKPOINTS, LAST_CHECKPOINT
from runner.errors import StageError
from runner.lightning.gradual import GradualPruning
from runner.lightning.keep import KeepBest
from runner.lightning.module import ClassifierModule, NonFiniteLoss
from runner.lightning.resume import prepare_resume
from runner.lightning.shards import RankExamples
from runner.lightning.teacher import Teacher
from runner.lightning.trainer import fitted_model


@contextlib.contextmanager
def interrupts_reach_us(trainer):
    """Lightning turns Ctrl-C into sys.exit(1) and leaves SIGINT ignored; give the CLI its KeyboardInterrupt
    back (it prints how to resume and exits 130) and restore the handler."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        yield
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def fit(spec, module: ClassifierModule, ctx, callbacks: list | None = None) -> dict:
    """Train `module` as the Training spec `spec` says (it may be a sub-spec, such as a retrain round);
    `ctx` is the stage's StageContext. Returns the fit's metrics."""
    data = ctx.data()
    callbacks = list(callbacks or [])
    gradual = GradualPruning(spec.gradual_pruning, ctx.name, ctx.seed) if spec.gradual_pruning else None
    if gradual is not None:
        callbacks.append(gradual)
    # Lightning's deterministic=True switches torch to deterministic algorithms for the whole process;
    # scope it to this fit, since int8 kernels (quantized conv) refuse to run under that switch.
    determinism = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    teacher = Teacher.of(spec.distillation.teacher, ctx) if spec.distillation else None
    if teacher is not None:
        module.teach_with(teacher)
    keeper = _keeper(spec, ctx)
    if keeper is not None:
        callbacks.append(keeper)
    if spec.early_stopping is not None:
        es = spec.early_stopping
        callbacks.append(EarlyStopping(monitor=es.monitor, mode="min" if es.monitor == "val_loss" else "max",
                                       patience=es.patience, min_delta=es.min_delta))
    trainer = ctx.build_trainer(
        callbacks=callbacks,
        override=spec.trainer,
        max_epochs=spec.epochs if spec.epochs is not None else -1,
        max_steps=spec.steps if spec.steps is not None else -1,
        gradient_clip_val=spec.gradient_clip,
        gradient_clip_algorithm=spec.gradient_clip_algorithm if spec.gradient_clip else None,
        check_val_every_n_epoch=spec.val_every_epochs,
    )
    shards = RankExamples()
    if trainer.world_size > 1:
        # Only a multi-process fit has shards to record; Lightning calls every callback's every hook on every
        # step whether it acts or not, so a one-process fit is spared that cost.
        trainer.callbacks.insert(0, shards)
    metrics: dict = {}
    with interrupts_reach_us(trainer):
        _tune(spec, module, data, trainer, metrics, ctx)
        # After tuning: the tuners start from the stage's initial weights, exactly as the first run did.
        checkpoint = prepare_resume(ctx.folder, module)
        start = time.perf_counter()
        try:
            trainer.fit(module, datamodule=data, ckpt_path=checkpoint, weights_only=True)
        except NonFiniteLoss as error:
            raise StageError(ctx.name, str(error), "the learning rate is probably too high: lower `optimizer.lr`, "
                             "add `warmup` or `gradient_clip`; check the data for NaN or infinite values") from None
        finally:
            torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
            data.trainer = None  # later direct reads (evaluate, calibration) see the whole split, unsharded
        wall = time.perf_counter() - start
    if trainer.interrupted:
        raise KeyboardInterrupt
    module.model = fitted_model(trainer, module, ctx.model_spec)
    if gradual is not None:
        try:
            gradual.check_finished(trainer.global_step, module.model)
        except StageError:
            # A rerun must train again and fail the same way: resuming this finished fit would skip the check
            # (Lightning runs no hooks for a fit that is over), and resuming an early-stopped one would train
            # one more epoch per rerun until a check happened to pass.
            forget_resume_point(ctx.folder)
            raise
    if keeper is not None:
        metrics["kept"] = keeper.restore(module.model)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    for key in ("train_loss", "val_loss", "val_acc"):
        if key in logged:
            metrics[key] = logged[key]
    samples = trainer.global_step * data.batch_size * trainer.accumulate_grad_batches  # batch_size is global
    metrics.update(epochs=trainer.current_epoch, steps=trainer.global_step, fit_seconds=round(wall, 3),
                   samples_per_second=round(samples / wall, 1) if wall > 0 else None,
                   final_lr=trainer.optimizers[0].param_groups[0]["lr"])
    if shards.summary is not None:
        metrics["rank_examples"] = shards.summary
    if checkpoint is not None:
        metrics["resumed"] = True  # fit_seconds and samples_per_second cover the resumed part only
    if gradual is not None:
        metrics["gradual_pruning"] = gradual.summary(module.model)
    if not spec.allow_chance_accuracy:
        check_above_chance(ctx.name, metrics, data)
    if teacher is not None:
        metrics["distillation"] = teacher.cost(wall, trainer.world_size)
    return metrics


def check_above_chance(stage: str, metrics: dict, data) -> None:
    """A fit that ends where a guess starts learned nothing, and calling it done would hide that: validation
    accuracy within 3 standard errors of 1/classes (a uniform guess's; binomial over the validation split) and a
    loss no better than the uniform guess's ln(classes). A model still learning has a lower loss."""
    accuracy, loss = metrics.get("val_acc"), metrics.get("val_loss")
    if accuracy is None or loss is None or metrics["epochs"] < 1:
        return
    classes, examples = data.num_classes, data.split_size("val")
    chance = 1 / classes
    if accuracy <= chance + 3 * math.sqrt(chance * (1 - chance) / examples) and loss >= 0.95 * math.log(classes):
        raise StageError(stage, f"training ended at chance: validation accuracy {accuracy:.3f} over {classes} classes "
                         f"(a guess gets {chance:.3f}) and loss {loss:.3f} (a uniform guess: {math.log(classes):.3f})",
                         "lower the learning rate, train longer, or check the data and its labels; set "
                         "`allow_chance_accuracy: true` if the stage means it (a control run)")


def forget_resume_point(stage_dir: Path) -> None:
    (Path(stage_dir) / CHECKPOINTS / LAST_CHECKPOINT).unlink(missing_ok=True)


def _keeper(spec, ctx) -> KeepBest | None:
    """The KeepBest callback for `keep: best`, refused where the best epoch's weights would mislead."""
    if spec.keep.epoch != "best":
        return None
    if spec.gradual_pruning is not None:
        raise StageError(ctx.name, "`keep: best` with `gradual_pruning`: an earlier epoch than the last has not "
                         "reached the target sparsity", "keep the last epoch, or prune in a later stage")
    return KeepBest(spec.keep.monitor, spec.keep.direction)


@contextlib.contextmanager
def _quiet_lr_finder_bar():
    """Lightning's LR finder draws its own tqdm bar whatever the Trainer's progress bar; one style only:
    the finder runs silently (its result is logged and in the metrics)."""
    from pytorch_lightning.tuner import lr_finder

    original = getattr(lr_finder, "tqdm", None)
    if original is not None:
        lr_finder.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            lr_finder.tqdm = original


def _tune(spec, module: ClassifierModule, data, trainer, metrics: dict, ctx) -> None:
    tuner = Tuner(trainer)
    if spec.batch_size_finder is not None:
        found = spec.batch_size_finder
        metrics["batch_size_found"] = tuner.scale_batch_size(
            module, datamodule=data, mode=found.mode, steps_per_trial=found.steps_per_trial, init_val=data.batch_size,
            max_trials=found.max_trials)
    if spec.lr_finder is not None:
        with _quiet_lr_finder_bar():
            finder = tuner.lr_find(module, datamodule=data, min_lr=spec.lr_finder.min_lr,
                                   max_lr=spec.lr_finder.max_lr, num_training=spec.lr_finder.num_steps)
        if finder is not None:
            metrics["lr_finder"] = _record_lr_finder(finder, spec.lr_finder.num_steps, ctx)
        if finder is None or finder.suggestion() is None:
            raise StageError(ctx.name, "the learning-rate finder found no usable learning rate",
                             "widen `lr_finder.min_lr`/`max_lr` or set `optimizer.lr` yourself")
        module.lr = float(finder.suggestion())
        metrics["lr_found"] = module.lr


def _record_lr_finder(finder, asked: int, ctx) -> dict:
    """Save the range test's curve (lr_finder.json, lr_finder.png) and warn when it rests on fewer steps than asked."""
    from rich.console import Console

    from runner import plots
    from runner.files import write_json

    lrs, losses = [float(v) for v in finder.results["lr"]], [float(v) for v in finder.results["loss"]]
    suggestion = finder.suggestion()
    write_json(ctx.folder / "lr_finder.json", {"lr": lrs, "loss": losses, "suggestion": suggestion, "steps_asked": asked})
    if plots.missing_notice() is None:
        plots.lr_finder_curve(lrs, losses, suggestion, ctx.folder / "lr_finder.png", f"{ctx.name}: LR range test")
    if len(lrs) < asked:
        # Lightning stops the test when the loss exceeds 4x its best (divergence: expected at high rates);
        # otherwise the stage's epochs held fewer batches than the test asked for.
        diverged = min(losses) > 0 and losses[-1] > 4 * min(losses)
        why = (f"it stopped when the loss diverged at lr {lrs[-1]:.3g}" if diverged else
               "the stage's epochs hold fewer training batches: raise `epochs`, lower `lr_finder.num_steps` "
               "or set `optimizer.lr` yourself")
        Console(stderr=True, highlight=False).print(
            f"[yellow]warning[/]: stage `{ctx.name}`: the LR finder ran {len(lrs)} of {asked} steps; {why} "
            "(its curve: lr_finder.png in the stage folder)", soft_wrap=True)
    return {"steps": len(lrs), "steps_asked": asked}
