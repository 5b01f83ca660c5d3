"""Install a routing rule on a MoE layer's router, and put the router back exactly afterwards.

Simulated pruning, the EEP working copy and the exact router transfer all route a layer differently
without touching the model's code: the router still computes its original logits, a function of those
logits gives the layer's ``(logits, weights, index)``, and the block routes by them. This module is the
one place that replaces a router's forward, sets the layer's top-k, and saves and restores everything
it (or a surgery around it) changes: the router's forward, the top-k of block and router, the expert
counts of block, router and experts, and the router's own tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moeshrink.arch import MoELayer, join_router_output, split_router_output
from moeshrink.surgery.apply import set_top_k

# Original router logits [T, E] -> the layer's (logits [T, K], top_k_weights [T, k], top_k_index [T, k]).
RouteFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def set_router_expert_count(router: nn.Module, count: int) -> None:
    """Set a router's own expert count (``num_experts`` and ``out_features``, where it has them): the
    DeepSeek routers read ``num_experts`` in their forward, so it must match the router's rows."""
    if hasattr(router, "num_experts"):
        router.num_experts = count
    if hasattr(router, "out_features"):
        router.out_features = count


def _put_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put this very tensor object back on ``module``: a buffer stays a buffer, a parameter re-registers."""
    if name in module._buffers:
        module._buffers[name] = tensor
    else:
        setattr(module, name, tensor)


@dataclass
class RouterState:
    """What a router installer or a surgery may change on one MoE layer, saved to be put back exactly.

    The saved tensors are the model's own objects (no copies), so restoring is cheap and exact."""

    layer: MoELayer
    forward: Callable | None  # a forward already installed on the router instance (None: its class's)
    tensors: dict[str, torch.Tensor]  # the router's row tensors (weight, bias, correction bias)
    top_k: dict[nn.Module, int]  # top_k of block and router, where present
    num_experts: dict[nn.Module, int]  # num_experts of block, router and experts, where present
    out_features: int | None  # the router's out_features (nn.Linear routers)

    @classmethod
    def save(cls, layer: MoELayer) -> RouterState:
        """The layer's routing state as it is now."""
        router = layer.router
        return cls(
            layer=layer,
            forward=router.__dict__.get("forward"),
            tensors=dict(layer.router_tensors()),
            top_k={m: m.top_k for m in (layer.block, router) if hasattr(m, "top_k")},
            num_experts={
                m: m.num_experts for m in (layer.block, router, layer.experts) if hasattr(m, "num_experts")
            },
            out_features=getattr(router, "out_features", None),
        )

    def restore_rows(self) -> None:
        """Put back only the router's own tensors and expert count (the block's and experts' counts, the
        forward and the top-k stay as they are): the router computes its original logits again."""
        router = self.layer.router
        for name, tensor in self.tensors.items():
            _put_tensor(router, name, tensor)
        if router in self.num_experts:
            router.num_experts = self.num_experts[router]
        if self.out_features is not None:
            router.out_features = self.out_features

    def restore(self) -> None:
        """Put everything back: router tensors, expert counts, the router's forward and the top-k."""
        self.restore_rows()
        for module, count in self.num_experts.items():
            module.num_experts = count
        if self.forward is None:
            self.layer.router.__dict__.pop("forward", None)
        else:
            self.layer.router.forward = self.forward
        for module, k in self.top_k.items():
            module.top_k = k


def install_router(
    layer: MoELayer,
    route: RouteFn,
    *,
    top_k: int | None = None,
    source: nn.Module | None = None,
    source_top_k: int | None = None,
) -> RouterState:
    """Make ``layer``'s router return ``route(original logits)``; returns the state to restore.

    The original logits come from the router's forward as it is now (its own rows), or from ``source``,
    a separate module with the router's interface (moved to the input's device when it is elsewhere: it
    is not a submodule, so ``model.to()`` does not move it). ``source_top_k``, when given, is the
    top-k that module runs at while it computes them (put back right after), e.g. the original top-k
    while the layer routes to fewer. ``top_k``, when given, becomes the layer's top-k (block and router,
    via :func:`~moeshrink.surgery.apply.set_top_k`). Logits and weights are returned in the dtypes of
    the original ones. Nothing else changes: set expert counts or tensors around this as needed, and
    :meth:`RouterState.restore` puts back what was there before the call."""
    state = RouterState.save(layer)
    module = layer.router if source is None else source
    compute = layer.router.forward if source is None else source

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if source is not None and source.weight.device != hidden_states.device:
            source.to(hidden_states.device)
        if source_top_k is None:
            original = compute(hidden_states)
        else:
            previous, module.top_k = module.top_k, source_top_k
            try:
                original = compute(hidden_states)
            finally:
                module.top_k = previous
        logits, weights, _ = split_router_output(original)
        new_logits, new_weights, new_index = route(logits)
        return join_router_output(
            original, new_logits.to(logits.dtype), new_weights.to(weights.dtype), new_index
        )

    layer.router.forward = forward
    if top_k is not None:
        set_top_k(layer, top_k)
    return state


@contextmanager
def installed_router(
    layer: MoELayer,
    route: RouteFn,
    *,
    top_k: int | None = None,
    source: nn.Module | None = None,
    source_top_k: int | None = None,
) -> Iterator[RouterState]:
    """:func:`install_router` for the duration of the block; the layer is restored exactly on exit."""
    state = install_router(layer, route, top_k=top_k, source=source, source_top_k=source_top_k)
    try:
        yield state
    finally:
        state.restore()
