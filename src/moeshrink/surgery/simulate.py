"""Simulate pruning without surgery: route as if some experts were gone, on the unchanged model.

Used to check that surgery is exact (a pruned model must equal its original with the dropped
experts masked out of routing), and by methods that score candidate subsets by re-routing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.surgery.router import RouteFn, installed_router


def _masked_route(layer: MoELayer, allowed: torch.Tensor) -> RouteFn:
    """Route ``layer``'s original logits by the family's rule, choosing only experts where ``allowed``
    is True (the logits themselves are passed on unchanged)."""

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, index = layer.route(logits, allowed)
        return logits, weights, index

    return route


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
    with ExitStack() as stack:
        for index, mask in allowed.items():
            layer = layers[index]
            stack.enter_context(installed_router(layer, _masked_route(layer, mask), top_k=top_k))
        yield
