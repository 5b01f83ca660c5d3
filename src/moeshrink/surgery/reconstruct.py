"""Least-squares reconstruction of merged experts (no reference tool has it).

A merged expert replaces a cluster S. On the calibration tokens the router sent to any member, the
cluster contributed ``y(x) = sum_{j in S} g_j(x) E_j(x)``. The merged expert will receive about the
cluster's total gate ``G(x) = sum_{j in S} g_j(x)`` (exactly what the ``logsumexp`` router row aims
for), so per unit of gate it should output ``y(x) / G(x)``. Its gate and up projections are kept
(merged and aligned); its down projection ``D`` (and bias, where the family has one) is re-fitted in
closed form:

    min_D  sum_x G(x)^2 * || D h(x) - y(x) / G(x) ||^2  +  lambda * || D - D_merged ||^2

with ``h(x)`` the merged expert's intermediate activation: a ridge regression pulled towards the
merged weights, with ``lambda = ridge * trace(H^T W H) / I``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshrink.arch import MoELayer
from moeshrink.plan import LayerPlan


@dataclass
class ClusterTarget:
    """What a cluster produced on its tokens, measured before surgery."""

    tokens: torch.Tensor  # indices into the input sample
    target: torch.Tensor  # y(x) / G(x)  [n, H]
    weight: torch.Tensor  # G(x)^2  [n]


@torch.no_grad()
def cluster_targets(
    layer: MoELayer, plan: LayerPlan, inputs: torch.Tensor, logits: torch.Tensor
) -> dict[int, ClusterTarget]:
    """For every merged new expert (index in ``plan.experts``), its cluster's output on the sampled
    tokens routed to any member, computed with the original experts (call before surgery)."""
    device = layer.router.weight.device
    weights, index = layer.route(logits.to(device))
    inputs = inputs.to(device)
    out: dict[int, ClusterTarget] = {}
    for i, expert in enumerate(plan.experts):
        if len(expert.sources) < 2:
            continue
        members = torch.tensor(expert.sources, device=device)
        hit = torch.isin(index, members)
        tokens = hit.any(dim=1).nonzero().squeeze(1)
        if tokens.numel() == 0:
            continue
        total = torch.zeros(tokens.numel(), inputs.shape[1], dtype=torch.float64, device=device)
        gate = torch.zeros(tokens.numel(), dtype=torch.float64, device=device)
        for slot in range(index.shape[1]):
            chosen = hit[tokens, slot]
            rows = tokens[chosen]
            if rows.numel() == 0:
                continue
            g = weights[rows, slot].double()
            y = layer.expert_outputs(inputs[rows].to(layer.router.weight.dtype), index[rows, slot]).double()
            total[chosen] += g[:, None] * y
            gate[chosen] += g
        # A gate can be exactly 0 (a member in the second slot, its logit ~100 below the first: the
        # softmax underflows); such a token carries no weight and its target would be 0 / 0.
        kept = gate > 0
        if not kept.any():
            continue
        out[i] = ClusterTarget(
            tokens=tokens[kept], target=total[kept] / gate[kept, None], weight=gate[kept] ** 2
        )
    return out


@torch.no_grad()
def refit_down_projection(
    layer: MoELayer, new_expert: int, inputs: torch.Tensor, target: ClusterTarget, ridge: float = 1e-2
) -> dict[str, torch.Tensor]:
    """Re-fit expert ``new_expert``'s down projection (and bias) in place; returns the new tensors by name."""
    device = layer.router.weight.device
    x = inputs.to(device)[target.tokens].to(layer.router.weight.dtype)
    h = layer.intermediate(x, new_expert).double()
    down = next(t for t in layer.expert_tensors if t.name == "down_proj")
    has_bias = any(t.name == "down_proj_bias" for t in layer.expert_tensors)
    current = layer.param("down_proj")[new_expert].double()
    d0 = current if down.neuron_dim == 1 else current.T  # [H, I]
    if has_bias:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=device)], dim=1)
        d0 = torch.cat([d0, layer.param("down_proj_bias")[new_expert].double()[:, None]], dim=1)
    w = target.weight.to(device)
    gram = h.T @ (w[:, None] * h)
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    rhs = h.T @ (w[:, None] * target.target.to(device)) + lam * d0.T
    solution = torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=device), rhs
    ).T
    refit = {}
    new_down = solution[:, : d0.shape[1] - int(has_bias)]
    new_down = new_down if down.neuron_dim == 1 else new_down.T
    layer.param("down_proj").data[new_expert] = new_down.to(current.dtype)
    refit["down_proj"] = layer.param("down_proj").data[new_expert].clone()
    if has_bias:
        layer.param("down_proj_bias").data[new_expert] = solution[:, -1].to(current.dtype)
        refit["down_proj_bias"] = layer.param("down_proj_bias").data[new_expert].clone()
    return refit
