"""Recovery after expert-level compression: re-fit what pruning or merging left wrong in one MoE layer.

On the calibration tokens sampled at this layer (``x_t``, the layer's inputs as the compressed model
before it produces them), the original layer's routed experts produced ``y_t = sum_e g_e(x_t) E_e(x_t)``.
Recovery fits two things of the compressed layer so that its routed output matches ``y_t``, each in
closed form with a ridge pull towards the weights it starts from (``lambda = ridge * mean diagonal of
the Gram matrix``, the scale the merged-expert reconstruction uses, :mod:`surgery.reconstruct`):

1. **Router rows** (``router``). Routing is top-k of a softmax or sigmoid, so fitting the rows to the
   output error is not linear. The well-posed part is the logits: for every sampled token whose
   original top-k held an expert that no longer exists (``j``), the kept expert whose output on that
   token is most like ``E_j(x_t)`` (by cosine, among the compressed router's top ``k + 2``) should
   receive ``j``'s routing mass. Its target logit is the logit of the summed mass (log-sum-exp of the
   two logits for softmax routers, the logit of the summed sigmoid scores for sigmoid routers, as the
   merging methods' ``logsumexp`` router row does); every other logit's target is its current value.
   The rows are then one ridge regression ``min_W sum_t ||W x_t + b - target_t||^2 + lambda ||W - W0||^2``
   (one ``[H, H]`` Gram, one solve for all rows). The new rows are kept only if they lower the layer's
   output error on the calibration tokens; the plan records which.
2. **Down projections** (``down``) of every kept expert, with the routing as it now is: minimise
   ``sum_t || sum_{i in topk'(t)} g'_i(t) D_i a_i(t) - y_t ||^2`` over the ``D_i``. This is linear in
   all the ``D_i`` together, but its joint Gram is ``(K * I)^2`` (64 experts of 1408 neurons: 8e9
   entries), so it is solved block by block: one Gauss-Seidel sweep over the experts, each ``D_i`` the
   ridge solution with the others fixed (the residual ``y_t`` minus the other experts' contributions is
   its target). Each block step cannot raise the fitted error; it is the merged-expert reconstruction's
   solver (:func:`~moeshrink.surgery.reconstruct.refit_down_projection`) with the residual as target.

The errors recorded are relative: ``sum_t ||yhat_t - y_t||^2 / sum_t ||y_t||^2`` on the sampled tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moeshrink.arch import MoELayer, split_router_output
from moeshrink.arch.routing import sigmoid_probabilities
from moeshrink.plan import LayerPlan
from moeshrink.surgery.reconstruct import ClusterTarget, refit_down_projection

# (token, expert) pairs evaluated per call to the experts: bounds the memory of one call.
PAIR_CHUNK = 8192
# Extra candidates, beyond the compressed top-k, for the kept expert that takes a removed one's mass.
EXTRA_CANDIDATES = 2
SIGMOID_CLAMP = 1e-4


@dataclass
class Recovered:
    """What recovery did to one layer: its errors and the tensors it re-fitted (``"{expert}.{name}"``)."""

    errors: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def names(self) -> dict[int, list[str]]:
        """Re-fitted tensor names by new expert."""
        out: dict[int, list[str]] = {}
        for key in self.tensors:
            index, name = key.split(".", 1)
            out.setdefault(int(index), []).append(name)
        return out


def snapshot(layer: MoELayer) -> MoELayer:
    """A copy of ``layer``'s MoE block (router, experts, shared experts), taken before a step changes it."""
    block = copy.deepcopy(layer.block)
    names = {id(m): n for n, m in layer.block.named_modules()}

    def same(module):
        return block.get_submodule(names[id(module)])

    return dataclasses.replace(
        layer,
        block=block,
        router=same(layer.router),
        experts=same(layer.experts),
        shared_modules=tuple(same(m) for m in layer.shared_modules),
    )


@torch.no_grad()
def routing(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's router on ``x`` [T, H]: logits [T, E] (float32), gates [T, k], expert index [T, k]."""
    logits, weights, index = split_router_output(layer.router(x.to(layer.router.weight.dtype)))
    return logits.float(), weights.float(), index


@torch.no_grad()
def pair_outputs(layer: MoELayer, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Expert ``index[t, s]``'s output on ``x[t]`` for every slot [T, S, H] (float32, ungated)."""
    tokens, slots = index.shape
    flat_x = x.repeat_interleave(slots, dim=0) if slots > 1 else x
    flat_index = index.reshape(-1)
    parts = [
        layer.expert_outputs(flat_x[s : s + PAIR_CHUNK], flat_index[s : s + PAIR_CHUNK]).float()
        for s in range(0, flat_index.numel(), PAIR_CHUNK)
    ]
    return torch.cat(parts).reshape(tokens, slots, -1)


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """``sum ||estimate - target||^2 / sum ||target||^2``."""
    return float(
        (estimate.double() - target.double()).pow(2).sum() / target.double().pow(2).sum().clamp(min=1e-30)
    )


def ridge_solve(
    features: torch.Tensor, targets: torch.Tensor, start: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``argmin_W ||features W^T - targets||^2 + lambda ||W - start||^2`` with ``lambda = ridge * mean
    diagonal of the Gram`` (float64)."""
    gram = features.T @ features
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    rhs = features.T @ targets + lam * start.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs).T


@torch.no_grad()
def router_targets(
    original: MoELayer,
    layer: MoELayer,
    plan: LayerPlan,
    x: torch.Tensor,
    orig_logits: torch.Tensor,
    orig_index: torch.Tensor,
    orig_pairs: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Target logits [T, K] for the compressed router (see the module docstring), and how many
    (token, removed expert) pairs moved their mass."""
    logits, _, _ = routing(layer, x)
    targets = logits.double().clone()
    kept_old = {s for e in plan.experts for s, w in zip(e.sources, e.weights, strict=True) if w != 0}
    removed = torch.tensor(
        [j not in kept_old for j in range(original.num_experts)], dtype=torch.bool, device=orig_index.device
    )
    hit = removed[orig_index]  # [T, k] slots that chose a removed expert
    tokens, slots = hit.nonzero(as_tuple=True)
    if tokens.numel() == 0:
        return targets, 0
    width = min(layer.num_experts, layer.top_k + EXTRA_CANDIDATES)
    candidates = torch.topk(logits[tokens], width, dim=-1).indices  # [N, m]
    outputs = pair_outputs(layer, x[tokens], candidates)  # [N, m, H]
    lost = orig_pairs[tokens, slots]  # [N, H]: E_j(x_t)
    cosine = F.cosine_similarity(outputs, lost[:, None, :], dim=-1)
    best = candidates.gather(1, cosine.argmax(dim=1, keepdim=True)).squeeze(1)
    lost_logit = orig_logits[tokens, orig_index[tokens, slots]].double()
    # Several removed experts of one token may pick the same kept one: their masses add up.
    added = torch.zeros_like(targets)
    if layer.probabilities is sigmoid_probabilities:
        added.index_put_((tokens, best), torch.sigmoid(lost_logit), accumulate=True)
        mass = (torch.sigmoid(targets) + added).clamp(SIGMOID_CLAMP, 1 - SIGMOID_CLAMP)
        summed = torch.log(mass) - torch.log1p(-mass)
    else:  # log-sum-exp, relative to each token's largest current logit
        ref = targets.max(dim=1, keepdim=True).values
        added.index_put_((tokens, best), torch.exp(lost_logit - ref[tokens, 0]), accumulate=True)
        summed = torch.log(torch.exp(targets - ref) + added) + ref
    targets = torch.where(added > 0, summed, targets)
    return targets, int(tokens.numel())


def _linear_router(layer: MoELayer, x: torch.Tensor) -> bool:
    """Whether the router's logits are ``x W^T + b`` (every family's today; checked, not assumed)."""
    logits, _, _ = routing(layer, x[:64])
    bias = getattr(layer.router, "bias", None)
    linear = F.linear(x[:64].float(), layer.router.weight.float(), None if bias is None else bias.float())
    return torch.allclose(logits, linear, rtol=1e-2, atol=1e-3 * float(linear.abs().max().clamp(min=1)))


def _current(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's gates [T, k], expert index [T, k] and gated expert outputs [T, k, H] on ``x``."""
    _, gates, index = routing(layer, x)
    return gates, index, gates[..., None] * pair_outputs(layer, x, index)


def _fit_router(
    original: MoELayer,
    layer: MoELayer,
    plan: LayerPlan,
    x: torch.Tensor,
    routed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    y: torch.Tensor,
    ridge: float,
    errors: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Fit the router rows in place; keep them (and return :func:`_current`) only if they lower the
    error, else restore them and return None. What happened goes to ``errors``."""
    if not _linear_router(layer, x):
        errors["router"] = "kept: the router's logits are not linear in its input"
        return None
    targets, moved = router_targets(original, layer, plan, x, *routed)
    errors["router_moved"] = moved
    if not moved:
        errors["router"] = "kept: no calibration token had chosen a removed expert"
        return None
    weight, bias = layer.router.weight, getattr(layer.router, "bias", None)
    start = weight.data.clone()
    fitted = ridge_solve(
        x.double(), targets - (0.0 if bias is None else bias.double()), start.double(), ridge
    )
    weight.data.copy_(fitted.to(weight.dtype))
    trial = _current(layer, x)
    errors["after_router"] = relative_error(trial[2].sum(1), y)
    if errors["after_router"] < errors["before"]:
        errors["router"] = "fitted"
        return trial
    errors["router"] = "kept: the fitted rows did not lower the error"
    weight.data.copy_(start)
    return None


@torch.no_grad()
def recover_layer(
    original: MoELayer,
    layer: MoELayer,
    plan: LayerPlan,
    inputs: torch.Tensor,
    *,
    ridge: float,
    router: bool = True,
    down: bool = True,
) -> Recovered:
    """Re-fit ``layer`` (compressed by ``plan`` from ``original``) in place on the sampled ``inputs`` [T, H]."""
    device = layer.router.weight.device
    x = inputs.to(device).float()
    orig_logits, orig_gates, orig_index = routing(original, x)
    orig_pairs = pair_outputs(original, x, orig_index)
    y = (orig_gates[..., None] * orig_pairs).sum(1)

    gates, index, contributions = _current(layer, x)
    before = relative_error(contributions.sum(1), y)
    errors: dict[str, Any] = {"tokens": int(x.shape[0]), "before": before}
    result = Recovered(errors)
    if router:
        trial = _fit_router(original, layer, plan, x, (orig_logits, orig_index, orig_pairs), y, ridge, errors)
        if trial is not None:
            gates, index, contributions = trial
            for i in range(layer.num_experts):
                result.tensors[f"{i}.router.weight"] = layer.router.weight.data[i].detach().cpu().clone()
    if down:
        total = contributions.sum(1)
        for i in range(layer.num_experts):
            tokens, slots = (index == i).nonzero(as_tuple=True)
            g = gates[tokens, slots].double()
            live = g > 1e-8
            tokens, slots, g = tokens[live], slots[live], g[live]
            if tokens.numel() == 0:
                continue
            residual = y[tokens].double() - (total[tokens] - contributions[tokens, slots]).double()
            target = ClusterTarget(tokens=tokens, target=residual / g[:, None], weight=g**2)
            refit = refit_down_projection(layer, i, x, target, ridge)
            for name, tensor in refit.items():
                result.tensors[f"{i}.{name}"] = tensor.cpu()
            new = (
                gates[tokens, slots][:, None]
                * pair_outputs(layer, x[tokens], torch.full_like(tokens, i)[:, None])[:, 0]
            )
            total[tokens] += new - contributions[tokens, slots]
            contributions[tokens, slots] = new
        errors["down"] = "fitted"
    _, _, final = _current(layer, x)
    errors["after"] = relative_error(final.sum(1), y)
    return result
