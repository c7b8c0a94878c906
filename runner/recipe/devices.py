"""Trainer settings checked against Lightning's rules and this machine, before anything starts."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

GPU_NAMES = ("gpu", "cuda")


@dataclass(frozen=True)
class Machine:
    """What this process can use; probed once."""

    cuda_devices: int
    bf16_on_cuda: bool
    mps: bool
    cpu_cores: int
    torch_xla: bool
    deepspeed: bool

    @staticmethod
    @cache
    def probe() -> "Machine":
        if _no_gpu_driver():
            cuda, bf16, mps = 0, False, False
        else:
            import torch

            cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
            bf16, mps = bool(cuda) and torch.cuda.is_bf16_supported(), torch.backends.mps.is_available()
        return Machine(
            cuda_devices=cuda,
            bf16_on_cuda=bf16,
            mps=mps,
            cpu_cores=os.cpu_count() or 1,
            torch_xla=importlib.util.find_spec("torch_xla") is not None,
            deepspeed=importlib.util.find_spec("deepspeed") is not None,
        )

    def accelerator(self, asked: str) -> str:
        """What `auto` becomes (Lightning's order: TPU, CUDA, MPS, CPU); `gpu` is `cuda` here."""
        if asked == "auto":
            if self.torch_xla:
                return "tpu"
            return "cuda" if self.cuda_devices else "mps" if self.mps else "cpu"
        return "cuda" if asked in GPU_NAMES else asked


def _no_gpu_driver() -> bool:
    """A Linux machine without NVIDIA's or AMD's GPU driver loaded: torch would find no GPU, so there is no need to
    import it (seconds of `validate`) to ask. macOS keeps asking (Apple's Metal backend)."""
    return (sys.platform.startswith("linux") and not Path("/proc/driver/nvidia").exists()
            and not Path("/dev/kfd").exists())


def world_size(settings, machine: Machine | None = None) -> int:
    """How many processes train: devices per node times nodes (`auto` devices: every GPU, one CPU process)."""
    machine = machine or Machine.probe()
    devices = settings.devices
    if devices == "auto":
        devices = machine.cuda_devices if machine.accelerator(settings.accelerator) == "cuda" else 1
    return max(devices, 1) * settings.num_nodes


def problems(settings, machine: Machine | None = None) -> list[tuple[str, str, str | None]]:
    """(field, message, hint) for each combination Lightning cannot run here."""
    machine = machine or Machine.probe()
    found = []
    accelerator = machine.accelerator(settings.accelerator)
    devices = settings.devices

    if settings.accelerator == "tpu" and not machine.torch_xla:
        found.append(("accelerator", "accelerator `tpu` needs torch_xla, which is not installed",
                      "install torch_xla matching your torch (a TPU VM image has it), or use `cpu`/`gpu`"))
    if settings.accelerator in GPU_NAMES and not machine.cuda_devices:
        found.append(("accelerator", f"accelerator `{settings.accelerator}` but no CUDA GPU is visible on this machine",
                      "use `accelerator: cpu`, or `auto` to take a GPU when there is one"))
    if settings.accelerator == "mps" and not machine.mps:
        found.append(("accelerator", "accelerator `mps` but Apple's Metal backend is not available here",
                      "use `accelerator: cpu` or `auto`"))
    if isinstance(devices, int):
        if accelerator == "cuda" and machine.cuda_devices and devices > machine.cuda_devices:
            found.append(("devices", f"devices: {devices} but this machine has {machine.cuda_devices} CUDA "
                          f"GPU{'s' if machine.cuda_devices != 1 else ''}", "lower `devices` or use `auto`"))
        if accelerator == "mps" and devices > 1:
            found.append(("devices", "the `mps` accelerator has one device", "use `devices: 1`"))
        if accelerator == "cpu" and devices > machine.cpu_cores:
            found.append(("devices", f"devices: {devices} CPU processes but this machine has {machine.cpu_cores} cores",
                          f"use at most {machine.cpu_cores}"))

    if settings.strategy == "ddp_spawn":
        found.append(("strategy", "`ddp_spawn` is not supported: its workers hand back only the weights, and pruning "
                      "masks (parametrized modules) cannot be pickled to them",
                      "use `strategy: ddp` (the same training; its processes start once, for the whole recipe)"))
    if settings.strategy == "fsdp" and accelerator != "cuda":
        found.append(("strategy", f"`fsdp` runs only on CUDA GPUs; Lightning refuses it with accelerator "
                      f"`{settings.accelerator}`" + (f" (here: {accelerator})" if settings.accelerator == "auto" else ""),
                      "use `strategy: ddp` on CPU, or `accelerator: gpu` on a GPU machine"))
    if settings.strategy == "deepspeed":
        if not machine.deepspeed:
            found.append(("strategy", "strategy `deepspeed` needs the deepspeed package, which is not installed",
                          "pip install deepspeed, or use `fsdp` (built into torch)"))
        elif accelerator != "cuda":
            found.append(("strategy", "`deepspeed` runs only on CUDA GPUs", "use `strategy: ddp` on CPU"))
    for options in ("fsdp", "deepspeed"):
        if getattr(settings, options) is not None and settings.strategy != options:
            found.append((options, f"`{options}` options given but the strategy is `{settings.strategy}`",
                          f"set `strategy: {options}` or remove the `{options}` block"))

    if settings.sync_batchnorm and accelerator != "cuda":
        found.append(("sync_batchnorm", "torch's SyncBatchNorm runs only on CUDA GPUs",
                      "remove `sync_batchnorm` (each CPU process then normalizes over its share of the batch)"))
    if settings.precision == "16-mixed" and accelerator == "cpu":
        found.append(("precision", "`16-mixed` (float16 AMP) runs only on GPUs; on CPU Lightning would silently "
                      "switch to bfloat16", "use `precision: bf16-mixed` on CPU"))
    if settings.precision == "bf16-mixed" and accelerator == "cuda" and machine.cuda_devices and not machine.bf16_on_cuda:
        import torch

        found.append(("precision", f"this GPU ({torch.cuda.get_device_name(0)}) does not support bfloat16",
                      "use `precision: 16-mixed` (needs Ampere or newer for bf16)"))

    launched = os.environ.get("WORLD_SIZE") if "LOCAL_RANK" in os.environ else None
    if launched is not None and launched.isdigit() and int(launched) != world_size(settings, machine):
        found.append(("devices", f"the launcher started {launched} processes (WORLD_SIZE={launched}) but "
                      f"devices x num_nodes = {world_size(settings, machine)}",
                      "set `devices` to the processes per node (torchrun --nproc_per_node) and `num_nodes` to the nodes"))
    return found
