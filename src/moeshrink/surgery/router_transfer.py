"""Exact router transfer: route K new experts with the original E-way router and a matrix T [K, E].

New expert i receives the routing probability ``sum_j T_ij p_j(x)`` of the original router. No
standard router (a linear map then the family's scoring rule) computes that when a row of T mixes
experts, so a merged checkpoint normally carries a least-squares fold of T into ordinary router rows
(what transformers and vLLM load). For when that approximation matters, the exact transfer can be
saved in the checkpoint folder as TRANSFER_FILENAME (a subfolder, so that serving engines that load
every top-level ``*.safetensors`` file never see it), a documented per-layer format:

* ``"{layer}.router.{name}"`` — the original router's tensors (``weight [E, H]``, and ``bias`` when
  the family's router has one), and
* ``"{layer}.transfer"`` — ``T [K, E]``,

and :func:`moeshrink.io.checkpoint.load_model` then installs it: each router keeps its folded rows in
the standard weights, but its forward computes the original E logits, transfers them, and routes the
K experts by the family's own rule.

Grouped routing (DeepSeek-V2/V3) is modelled as it is: the K new experts form ``n_group`` contiguous
groups of K / n_group (a transfer only ever mixes experts of one original group, see
:func:`group_blocks`), the family's rule picks ``topk_group`` groups among them, and DeepSeek-V3's
``e_score_correction_bias`` of a new expert is the T-weighted mean of its sources' biases
(:func:`transfer_bias`; a kept expert keeps its own, so pruning stays exact).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.arch.routing import sigmoid_probabilities
from moeshrink.surgery.router import RouteFn, install_router, set_router_expert_count

TRANSFER_FILENAME = "moeshrink_extras/router_transfer.safetensors"  # beside the weights, not among them
LEGACY_TRANSFER_FILENAME = (
    "moeshrink_router_transfer.safetensors"  # the top-level name before 0.2; still read
)


def one_hot_rows(matrix: torch.Tensor) -> list[int] | None:
    """The column of each row when every row is exactly one 1 and zeros elsewhere, else None."""
    ones = (matrix == 1).sum(1) == 1
    zeros = (matrix == 0).sum(1) == matrix.shape[1] - 1
    if not bool((ones & zeros).all()):
        return None
    return matrix.argmax(1).tolist()


def transfer_logits(layer: MoELayer, logits: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    """Router logits [N, K] of the new experts under the exact transfer ``transfer [K, E]``.

    Softmax routers: ``log sum_j T_ij exp(l_j)``, whose softmax over the K new experts is the
    transferred probability renormalised (one-hot rows: the plain kept logit, so pruning is exact).
    Sigmoid routers: the logit of ``sum_j T_ij sigmoid(l_j)``."""
    kept = one_hot_rows(transfer)
    if kept is not None:
        return logits[:, kept].float()
    t = transfer.to(device=logits.device, dtype=torch.float32)
    if layer.probabilities is sigmoid_probabilities:
        total = (torch.sigmoid(logits.float()) @ t.T).clamp(1e-6, 1 - 1e-6)
        return torch.log(total) - torch.log1p(-total)
    return torch.logsumexp(logits.float()[:, None, :] + t.log()[None], dim=-1)


def transfer_state(
    original_routers: dict[int, dict[str, torch.Tensor]], transfers: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of TRANSFER_FILENAME for these layers' original router tensors and transfers."""
    state = {}
    for index, transfer in transfers.items():
        for name, tensor in original_routers[index].items():
            state[f"{index}.router.{name}"] = tensor.detach().cpu().clone().contiguous()
        state[f"{index}.transfer"] = transfer.detach().float().cpu().contiguous()
    return state


def group_blocks(num_experts: int, new_experts: int, groups: int) -> torch.Tensor:
    """``[K, E]`` boolean mask: new expert i may draw on original expert j only when both lie in the
    same routing group (contiguous groups of K / groups and E / groups); all True for one group."""
    if groups <= 1:
        return torch.ones(new_experts, num_experts, dtype=torch.bool)
    new_group = torch.arange(new_experts) // (new_experts // groups)
    old_group = torch.arange(num_experts) // (num_experts // groups)
    return new_group[:, None] == old_group[None, :]


def transfer_bias(bias: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    """The selection bias ``[K]`` of the new experts: each row's T-weighted mean of the original biases
    ``bias [E]`` (a one-hot row: that expert's own bias, exactly)."""
    kept = one_hot_rows(transfer)
    if kept is not None:
        return bias[kept].float()
    t = transfer.to(device=bias.device, dtype=torch.float32)
    return (t @ bias.float()) / t.sum(1).clamp(min=1e-12)


class RouterView:
    """The router's routing options (top-k, groups, scaling) with some attributes replaced, e.g. the
    correction bias of the new experts: what a scoring rule reads, without touching the router."""

    def __init__(self, router: nn.Module, **replaced: object):
        self._router, self._replaced = router, replaced

    def __getattr__(self, name: str) -> object:
        replaced = self.__dict__["_replaced"]
        return replaced[name] if name in replaced else getattr(self.__dict__["_router"], name)


def transfer_route(layer: MoELayer, transfer: torch.Tensor, bias: torch.Tensor | None = None) -> RouteFn:
    """Route the K new experts of ``layer`` from the original E logits: the exact transfer
    ``transfer [K, E]`` (:func:`transfer_logits`), then the family's scoring rule. ``bias`` is the
    original ``e_score_correction_bias [E]`` where the family has one (DeepSeek-V3): the new experts
    select with :func:`transfer_bias` of it."""
    router = layer.router
    if bias is not None:
        router = RouterView(layer.router, e_score_correction_bias=transfer_bias(bias, transfer))

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new_logits = transfer_logits(layer, logits, transfer)
        new_weights, new_index = layer.scoring(router, new_logits, None)
        return new_logits, new_weights, new_index

    return route


def install_router_transfer(
    model: nn.Module, adapter: FamilyAdapter, state: dict[str, torch.Tensor]
) -> list[int]:
    """Make the routers of ``model`` route by the exact transfers in ``state`` (see the module
    docstring); returns the layers changed. The standard (folded) router rows stay in place."""
    layers = {layer.index: layer for layer in adapter.moe_layers(model)}
    changed = sorted({int(key.split(".")[0]) for key in state})
    for index in changed:
        layer = layers[index]
        transfer = state[f"{index}.transfer"]
        bias = state.get(f"{index}.router.e_score_correction_bias")
        install_router(
            layer,
            transfer_route(layer, transfer, bias),
            source=_original_router(layer, index, state, transfer),
        )
    return changed


def _original_router(
    layer: MoELayer, index: int, state: dict[str, torch.Tensor], transfer: torch.Tensor
) -> nn.Module:
    """A private copy of ``layer``'s router with the original E rows of ``state``: the family's own
    logit computation for the transfer (only its logits are used, so its top-k is at most E)."""
    original = copy.deepcopy(layer.router)
    prefix = f"{index}.router."
    for key, tensor in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            value = tensor.to(device=layer.router.weight.device, dtype=getattr(layer.router, name).dtype)
            setattr(original, name, nn.Parameter(value, requires_grad=False))
    set_router_expert_count(original, transfer.shape[1])
    original.top_k = min(layer.top_k, transfer.shape[1])
    return original
