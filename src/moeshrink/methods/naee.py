"""NAEE (Lu et al., 2024, "Not All Experts are Equal"): per layer, keep the subset of experts whose
re-routed MoE output best reconstructs the full one on calibration tokens.

For a kept subset S the router's logits of the dropped experts are set to -inf, so each token
re-routes among S by the family's own rule (re-normalised top-k), and the error is
``sum_t ||Z_t - Z'_t||^2`` with Z the full layer's routed-expert output (shared experts cancel).
Every expert's output on the sampled tokens is computed once, ``Y [T, E, H]``; with the per-token Gram
matrices ``G_t = Y_t Y_t^T [E, E]`` a subset's error is ``sum_t d_t^T G_t d_t``, d = the difference
of the dense routing-weight vectors, so no candidate needs another expert forward: O(T E^2) each.
Exhaustive over all C(E, K) subsets up to ``max_subsets``, greedy elimination (drop, one at a time,
the expert whose removal hurts least) beyond. The layer's plan records how many subsets were
evaluated and how long it took.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
from pydantic import Field

from moeshrink.arch import MoELayer
from moeshrink.engine.observers import INPUTS, LOGITS, LayerStats
from moeshrink.methods.base import ExpertMethod, LayerBudget
from moeshrink.methods.options import MethodOptions
from moeshrink.plan import LayerPlan
from moeshrink.surgery import set_top_k


def dense_routing(layer: MoELayer, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Routing weights ``[B, T, E]`` (zero for unchosen experts) for ``B`` masks ``allowed [B, E]``."""
    b, (t, e) = allowed.shape[0], logits.shape
    flat_logits = logits.unsqueeze(0).expand(b, t, e).reshape(b * t, e)
    flat_allowed = allowed.unsqueeze(1).expand(b, t, e).reshape(b * t, e)
    weights, index = layer.route(flat_logits, flat_allowed)
    dense = torch.zeros(b * t, e, dtype=torch.float64)
    dense.scatter_add_(1, index.cpu(), weights.double().cpu())
    return dense.reshape(b, t, e)


class ReconstructionError:
    """Squared error of the layer's routed output for kept subsets, from cached expert outputs."""

    def __init__(self, layer: MoELayer, hidden: torch.Tensor, logits: torch.Tensor):
        self.layer, self.logits = layer, logits.float()
        num_experts, tokens = layer.num_experts, hidden.shape[0]
        chunk = max(1, (1 << 27) // (num_experts * hidden.shape[1] * 8))  # expert outputs held: <= 128 MiB
        grams = []
        with torch.no_grad():
            for start in range(0, tokens, chunk):
                x = hidden[start : start + chunk]
                outputs = torch.stack(
                    [
                        layer.expert_outputs(x, torch.full((x.shape[0],), j, device=x.device)).double().cpu()
                        for j in range(num_experts)
                    ],
                    dim=1,
                )  # [t, E, H]
                grams.append(outputs @ outputs.transpose(1, 2))
        self.gram = torch.cat(grams)  # [T, E, E]
        # Candidates scored at once: their dense routing weights [B, T, E] stay under ~256 MiB.
        self.batch = max(1, (1 << 25) // (tokens * num_experts))
        self.full = dense_routing(layer, self.logits, torch.ones(1, num_experts, dtype=torch.bool))[0]
        self.evaluated = 0

    def __call__(self, allowed: torch.Tensor) -> torch.Tensor:
        """Errors ``[B]`` of the masks ``allowed [B, E]``."""
        diff = dense_routing(self.layer, self.logits, allowed) - self.full
        self.evaluated += allowed.shape[0]
        return torch.einsum("bte,tef,btf->b", diff, self.gram, diff)


def _masks(subsets: list[tuple[int, ...]], num_experts: int) -> torch.Tensor:
    mask = torch.zeros(len(subsets), num_experts, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        mask[row, list(subset)] = True
    return mask


class NAEEPruning(ExpertMethod):
    """Keep the subset of experts that best reconstructs the MoE output (exhaustive, else greedy)."""

    name = "naee"
    needs = frozenset({INPUTS, LOGITS})

    class Options(MethodOptions):
        max_subsets: int = Field(
            20000, ge=1, description="exhaustive search up to this many subsets, else greedy"
        )
        max_tokens: int = Field(2048, ge=1, description="calibration tokens the error is measured on")

    settings: Options

    @torch.no_grad()
    def plan_layer(self, layer: MoELayer, stats: LayerStats | None, budget: LayerBudget) -> LayerPlan:
        start = time.perf_counter()
        set_top_k(layer, budget.top_k)  # subsets are scored as they will route
        device = layer.router.weight.device
        error = ReconstructionError(
            layer,
            stats.inputs[: self.settings.max_tokens].to(device, layer.router.weight.dtype),
            stats.logits[: self.settings.max_tokens],
        )
        e, k = layer.num_experts, budget.keep
        size, per_group = e // budget.groups, k // budget.groups
        combos = math.comb(size, per_group) ** budget.groups
        if combos <= self.settings.max_subsets:
            kept, best = self._exhaustive(error, e, budget.groups, per_group)
            search = "exhaustive"
        else:
            kept, best = self._greedy(error, e, budget.groups, per_group)
            search = "greedy"
        plan = LayerPlan.keep(layer.index, e, kept)
        plan.details = {
            "search": search,
            "subsets_evaluated": error.evaluated,
            "subsets_possible": combos,
            "tokens": int(error.full.shape[0]),
            "error": best,
            "relative_error": best
            / max(float(torch.einsum("te,tef,tf->", error.full, error.gram, error.full)), 1e-30),
            "seconds": time.perf_counter() - start,
        }
        return plan

    def _exhaustive(
        self, error: ReconstructionError, e: int, groups: int, per_group: int
    ) -> tuple[list[int], float]:
        size = e // groups
        per = [
            list(itertools.combinations(range(g * size, (g + 1) * size), per_group)) for g in range(groups)
        ]
        best, best_subset = math.inf, None
        subsets = (sum(parts, ()) for parts in itertools.product(*per))
        while chunk := list(itertools.islice(subsets, error.batch)):
            errors = error(_masks(chunk, e))
            i = int(errors.argmin())
            if float(errors[i]) < best:
                best, best_subset = float(errors[i]), chunk[i]
        return sorted(best_subset), best

    def _greedy(
        self, error: ReconstructionError, e: int, groups: int, per_group: int
    ) -> tuple[list[int], float]:
        size = e // groups
        kept = set(range(e))
        best = 0.0
        while len(kept) > per_group * groups:
            removable = [
                j for j in sorted(kept) if sum(1 for i in kept if i // size == j // size) > per_group
            ]
            candidates = [tuple(sorted(kept - {j})) for j in removable]
            errors = torch.cat(
                [
                    error(_masks(candidates[i : i + error.batch], e))
                    for i in range(0, len(candidates), error.batch)
                ]
            )
            i = int(errors.argmin())
            kept.remove(removable[i])
            best = float(errors[i])
        return sorted(kept), best
