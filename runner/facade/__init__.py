"""`import nnopt`: run and validate recipes, load artifacts (installed as the package `nnopt`; the code is runner/api.py).

    import nnopt
    result = nnopt.run("recipes/prune_then_quant.yaml", overrides={"stages.finetune.epochs": 2})
    model = nnopt.load("outputs/prune_then_quant/04-quantize")   # an nn.Module in eval mode
"""

from runner import __version__
from runner.api import load, run, validate
from runner.errors import RecipeError, RunError, StageError

__all__ = ["RecipeError", "RunError", "StageError", "__version__", "load", "run", "validate"]
