"""The forms a model takes between stages; each stage spec declares which it accepts and which it produces."""

from __future__ import annotations

FLOAT = "float"  # float weights a stage can train and prune (masks and slimming keep a model float)
SHARED = "weight-shared"  # float weights drawn from per-layer k-means codebooks (Han et al. 2016 §3)
INT8_DYNAMIC = "dynamic int8"  # int8 Linear/LSTM weights, activations quantized per batch
INT8_STATIC = "static int8"  # int8 weights and calibrated int8 activations (static_int8, qat)

ANY = frozenset({FLOAT, SHARED, INT8_DYNAMIC, INT8_STATIC})
WEIGHTS_CHANGE = frozenset({FLOAT})  # a stage that trains or prunes changes each weight on its own

# Why a form refuses a stage that changes weights, and what order works instead.
REFUSAL_HINTS = {
    SHARED: "weight sharing is the last change to the weights (Han et al. 2016: prune, fine-tune, then share); "
            "fine-tune the centroids with the quantize stage's own `finetune:` block",
    INT8_DYNAMIC: "prune and fine-tune before quantizing (train -> prune -> finetune -> quantize): int8 weights "
                  "have no gradients and a second quantizer finds nothing left in float",
    INT8_STATIC: "prune and fine-tune before quantizing (train -> prune -> finetune -> quantize): int8 weights "
                 "have no gradients and a second quantizer finds nothing left in float",
}
