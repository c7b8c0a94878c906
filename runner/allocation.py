"""Per-layer sparsity or codebook bits chosen from a sensitivity scan under a budget, for the least predicted loss.

The prediction adds up each layer's accuracy drop measured with that layer alone changed (the additive
model of Distiller's and SparseML's sensitivity analysis); between scanned levels a drop is interpolated
linearly, and it never decreases with sparsity (a lucky point of the scan is noise, not a gain).
"""

from __future__ import annotations

import math

import numpy as np


class AllocationError(ValueError):
    """The budget cannot be met within the bounds and the scanned range; the message says by how much."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def drop_curve(points: list[list[float]], start: float, baseline: float):
    """The predicted accuracy drop as a function of the layer's sparsity (or bits), from the scan's
    (level, accuracy) points and the unchanged model at `start`."""
    levels = np.array([start] + [p[0] for p in points], dtype=float)
    drops = np.maximum.accumulate(np.maximum(np.array([0.0] + [baseline - p[1] for p in points]), 0.0))
    return lambda level: np.interp(level, levels, drops)


def allocate_sparsity(scan: dict, names: list[str], target: float, bounds: dict[str, tuple[float, float]],
                      resolution: int = 4000, grid_step: float = 0.0025) -> dict:
    """Per-layer pruned counts summing to exactly round(target * all weights); see allocate_pruned."""
    total = sum(scan["layers"][n]["size"] for n in names)
    return allocate_pruned(scan, names, round(target * total), bounds, resolution, grid_step)


def pruned_for(scan: dict, names: list[str], keep_params: int | None = None, keep_bytes: int | None = None) -> int:
    """The weights to prune so that exactly `keep_params` stay nonzero in the named layers, or as many as
    `keep_bytes` hold as fp32 values (4 bytes each, the values a sparse format stores besides its indices)."""
    total = sum(scan["layers"][n]["size"] for n in names)
    kept = keep_params if keep_params is not None else keep_bytes // 4
    if kept > total:
        raise AllocationError(f"keeping {kept:,} weights is more than the {total:,} the pruned layers have",
                              f"keep at most {total:,} ({4 * total:,} bytes)")
    return total - kept


def allocate_pruned(scan: dict, names: list[str], wanted: int, bounds: dict[str, tuple[float, float]],
                    resolution: int = 4000, grid_step: float = 0.0025) -> dict:
    """Per-layer pruned counts summing to exactly `wanted`, each layer within its bounds and the scanned range,
    with the least predicted drop.

    A dynamic program over the layers, with the number of pruned weights counted in buckets of
    1/`resolution` of all weights, picks each layer's level on a grid; a last pass moves the few weights
    the buckets' rounding leaves over to the layers where they cost least. Returns {"sparsity": {name:
    exact fraction}, "pruned": {name: count}, "predicted_drop": {name: drop}, "predicted_total_drop": sum}.
    """
    layers = scan["layers"]
    sizes = {n: layers[n]["size"] for n in names}
    total = sum(sizes.values())
    target = wanted / total
    curves, low, high = {}, {}, {}
    for name in names:
        entry = layers[name]
        curves[name] = drop_curve(entry["pruned"], entry["sparsity"], scan["baseline_acc"])
        lo, hi = bounds.get(name, (0.0, 1.0))
        scanned = entry["pruned"][-1][0] if entry["pruned"] else entry["sparsity"]
        low[name] = math.ceil(max(lo, entry["sparsity"]) * sizes[name] - 1e-9)
        high[name] = math.floor(min(hi, scanned) * sizes[name] + 1e-9)
        if low[name] > high[name]:
            raise AllocationError(f"`{name}` has no sparsity within its bounds [{lo:g}, {hi:g}], at or above its "
                                  f"present {entry['sparsity']:.4g} and at most the scan's highest level {scanned:g}",
                                  "widen the bounds, or scan up to higher sparsity levels")
    reachable = (sum(low.values()) / total, sum(high.values()) / total)
    if not sum(low.values()) <= wanted <= sum(high.values()):
        raise AllocationError(f"the target sparsity {target:.6g} ({wanted:,} of {total:,} weights pruned) is outside "
                              f"what the layers can reach: [{reachable[0]:.4f}, {reachable[1]:.4f}] within their "
                              "bounds and the scanned levels",
                              "change the target or the bounds, or scan up to higher sparsity levels")

    bucket = max(1, total // resolution)
    best = np.full(total // bucket + len(names) + 2, np.inf)
    best[0] = 0.0
    choices = []
    for name in names:
        counts = np.unique(np.concatenate([
            np.round(np.arange(low[name], high[name], grid_step * sizes[name])).astype(np.int64),
            [low[name], high[name]],
            [round(p[0] * sizes[name]) for p in layers[name]["pruned"] if low[name] <= p[0] * sizes[name] <= high[name]],
        ]))
        costs = curves[name](counts / sizes[name])
        shifted = np.full((len(counts), len(best)), np.inf)
        for row, (count, cost) in enumerate(zip(counts, costs)):
            steps = int(round(count / bucket))
            shifted[row, steps:] = best[:len(best) - steps] + cost
        pick = shifted.argmin(axis=0)
        best = shifted[pick, np.arange(len(best))]
        choices.append((counts, pick))
    goal = int(round(wanted / bucket))
    window = np.arange(max(goal - len(names), 0), min(goal + len(names) + 1, len(best)))
    state = int(window[best[window].argmin()])
    if not np.isfinite(best[state]):  # cannot happen once the feasibility check passed; never guess
        raise AllocationError(f"no per-layer levels reach the target sparsity {target:.6g}", "widen the bounds")
    pruned = {}
    for name, (counts, pick) in zip(reversed(names), reversed(choices)):
        count = int(counts[pick[state]])
        pruned[name] = count
        state -= int(round(count / bucket))
    _settle(pruned, wanted, low, high, sizes, curves)
    drops = {n: float(curves[n](pruned[n] / sizes[n])) for n in names}
    return {"sparsity": {n: pruned[n] / sizes[n] for n in names}, "pruned": pruned,
            "predicted_drop": drops, "predicted_total_drop": sum(drops.values())}


def _settle(pruned: dict[str, int], wanted: int, low: dict, high: dict, sizes: dict, curves: dict) -> None:
    """Move the remaining difference to `wanted` onto the layers where it costs least per weight, in bounds."""
    while (missing := wanted - sum(pruned.values())) != 0:
        step = 1 if missing > 0 else -1
        options = []
        for name, count in pruned.items():
            room = high[name] - count if step > 0 else count - low[name]
            amount = min(abs(missing), room)
            if amount > 0:
                change = curves[name]((count + step * amount) / sizes[name]) - curves[name](count / sizes[name])
                options.append((step * change / amount, name, amount))
        _, name, amount = min(options)  # feasibility was checked: some layer always has room
        pruned[name] += step * amount


def layer_bytes(nonzeros: int, bits: int | None) -> float:
    """Bytes of a layer's nonzero values: 32-bit floats, or `bits`-bit codebook indices plus the codebook."""
    return nonzeros * 4.0 if bits is None else nonzeros * bits / 8 + 4 * 2**bits


def allocate_bits(scan: dict, nonzeros: dict[str, int], *, max_bytes: float | None = None,
                  max_drop: float | None = None) -> dict:
    """Codebook bits per layer (None: left in float) from the scan's weight-sharing curves, under a bytes budget
    on the values of the layers' `nonzeros` or a predicted accuracy-drop budget.

    Greedy, as accuracy-driven tuners do: start from every layer in float and repeatedly take the
    step (a layer into its widest scanned codebook, or one scanned width narrower) that saves the most
    bytes per unit of predicted drop; with `max_bytes`, stop once within it; with `max_drop`, take only
    the steps that keep the predicted total within it, until none is left.
    """
    layers, names = scan["layers"], list(nonzeros)
    accuracy = {n: {int(bits): acc for bits, acc in layers[n]["shared"]} for n in names}
    baseline = scan["baseline_acc"]
    chosen: dict[str, int | None] = {n: None for n in names}

    def drop(name: str, bits: int | None) -> float:
        return 0.0 if bits is None else max(baseline - accuracy[name][bits], 0.0)

    def used() -> float:
        return sum(layer_bytes(nonzeros[n], chosen[n]) for n in names)

    while max_bytes is None or used() > max_bytes:
        total = sum(drop(n, chosen[n]) for n in names)
        steps = []
        for name in names:
            narrower = [b for b in accuracy[name] if chosen[name] is None or b < chosen[name]]
            if not narrower:
                continue
            bits = max(narrower)
            saved = layer_bytes(nonzeros[name], chosen[name]) - layer_bytes(nonzeros[name], bits)
            added = max(drop(name, bits) - drop(name, chosen[name]), 0.0)
            if saved > 0 and (max_drop is None or total + added <= max_drop):
                steps.append((-(saved / (added + 1e-6)), name, bits))
        if not steps:
            if max_bytes is not None:
                raise AllocationError(f"the layers' values cannot fit in {max_bytes:,.0f} bytes with the scanned "
                                      f"codebooks: {used():,.0f} bytes at the narrowest",
                                      "raise the bytes budget, or scan narrower codebooks (fewer `bits`)")
            break
        _, name, bits = min(steps)
        chosen[name] = bits
    return {"bits": chosen, "bytes": used(), "predicted_drop": {n: drop(n, chosen[n]) for n in names},
            "predicted_total_drop": sum(drop(n, chosen[n]) for n in names)}
