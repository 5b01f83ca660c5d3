"""Simulate pruning without surgery: route as if some experts were gone, on the unchanged model.

Used to check that surgery is exact (a pruned model must equal its original with the dropped
experts masked out of routing), and by methods that score candidate subsets by re-routing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter


@contextmanager
def restricted_routing(
    model: nn.Module,
    adapter: FamilyAdapter,
    allowed: Mapping[int, torch.Tensor],
    top_k: int | None = None,
) -> Iterator[None]:
    """Within the block, MoE layer ``i`` routes only to experts where ``allowed[i]`` is True
    (and to ``top_k`` experts per token, when given)."""
    layers = {layer.index: layer for layer in adapter.moe_layers(model)}
    saved = []
    for index, mask in allowed.items():
        layer = layers[index]
        router, original = layer.router, layer.router.forward

        def forward(hidden_states, _layer=layer, _original=original, _mask=mask):
            logits, weights, _ = _original(hidden_states)
            new_weights, new_index = _layer.route(logits, _mask)
            return logits, new_weights.to(weights.dtype), new_index

        saved.append((router, getattr(router, "top_k", None)))
        router.forward = forward
        if top_k is not None:
            router.top_k = top_k
    try:
        yield
    finally:
        for router, k in saved:
            del router.forward
            if k is not None:
                router.top_k = k
