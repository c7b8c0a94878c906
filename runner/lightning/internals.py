"""The private Lightning internals nnopt relies on, all in one place; tests/test_architecture.py fails on a
Lightning version that changes any of them."""

from __future__ import annotations

import pytorch_lightning as pl

# Lightning stores the running hook's name on the LightningModule around every hook call, about 46
# times per training step; nn.Module.__setattr__ spends its time there checking whether a string is a
# Parameter, Module or buffer (about 5% of a LeNet-300-100 step on CPU), so our module stores it directly.
HOOK_NAME_ATTRIBUTE = "_current_fx_name"


def restore_loader_position(trainer: pl.Trainer) -> None:
    """Hand the train loader the position saved in the checkpoint being resumed.

    Lightning does this only when it builds the loader after the restore; `configure_optimizers`
    asking for `estimated_stepping_batches` builds it before, so the position would be dropped silently.
    """
    trainer.fit_loop._load_combined_loader_states()
