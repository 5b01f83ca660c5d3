"""Global budgets: a total number of experts shared out over the MoE layers.

Layers differ: where routing concentrates on a few experts, fewer need to stay; where it spreads,
more. The allocation ranks every (layer, expert) pair by the expert's share of its layer's routing
on the calibration tokens and keeps the globally largest, never fewer than ``minimum`` per layer and
in steps of ``unit`` experts (the routing groups of DeepSeek). Every method then compresses each
layer to its own count. vLLM and SGLang need one count for all layers, so a global budget yields a
checkpoint in the per-layer format (see ``moeshrink.io.export``).
"""

from __future__ import annotations

import torch

from moeshrink.errors import MoeShrinkError


def allocate_global(
    frequencies: dict[int, torch.Tensor], total: int, minimum: int, unit: int = 1
) -> dict[int, int]:
    """Experts to keep per layer, summing to ``total``, from each layer's expert usage frequencies."""
    layers = sorted(frequencies)
    sizes = {layer: int(frequencies[layer].numel()) for layer in layers}
    minimum = -(-minimum // unit) * unit  # round up to whole groups
    floor, ceiling = minimum * len(layers), sum(sizes.values())
    if total % unit:
        raise MoeShrinkError(f"a global budget must be a multiple of the {unit} routing groups, got {total}")
    if not floor <= total < ceiling:
        raise MoeShrinkError(
            f"a global budget of {total} experts must lie in [{floor}, {ceiling}) for {len(layers)} MoE layers "
            f"(at least {minimum} per layer): change --keep / --ratio"
        )
    counts = dict.fromkeys(layers, minimum)
    ranked = {
        layer: torch.sort(
            frequencies[layer].double() / frequencies[layer].sum().clamp(min=1e-12), descending=True
        ).values
        for layer in layers
    }
    while sum(counts.values()) < total:
        candidates = [
            (float(ranked[layer][counts[layer] : counts[layer] + unit].sum()), -layer, layer)
            for layer in layers
            if counts[layer] + unit <= sizes[layer]
        ]
        _, _, best = max(candidates)
        counts[best] += unit
    return counts
