"""NAEE (Lu et al., 2024, "Not All Experts are Equal"): per layer, keep the subset of experts whose
re-routed MoE output best reconstructs the full one on calibration tokens.

For a kept subset S the router's logits of the dropped experts are set to -inf, so each token
re-routes among S by the family's own rule (re-normalised top-k), and the error is
``sum_t ||Z_t - Z'_t||^2`` with Z the full layer's routed-expert output (shared experts cancel).
Every expert's output on the sampled tokens is computed once, ``Y [T, E, H]``, and kept only as the
per-token Gram matrices ``G_t = Y_t Y_t^T [E, E]``. With ``Z'_t = sum_i w'_i y_{c_i}`` over the k
experts token t routes to under S,

    ||Z_t - Z'_t||^2 = Z_t.Z_t - 2 sum_i w'_i (G_t w_t)[c_i] + sum_ij w'_i w'_j G_t[c_i, c_j],

k^2 + k numbers per token and subset (:class:`SubsetErrors`). Where the family's rule is "the top-k
of S by the token's logits, weights by softmax" (Mixtral, Qwen-MoE, OLMoE, GraniteMoE, GPT-OSS), the
k chosen experts are found without routing: with the experts ranked per token, ``sum_{e in S}
2^rank_t(e)`` (one matrix product for a batch of subsets) has its k lowest set bits at the chosen
ranks; for top-1/top-2 each token's error per rank tuple is tabulated once. Tokens with two equal
logits (whose order ``torch.topk`` decides its own way) and other rules (DeepSeek's groups, PhiMoE's
sparsemixer) route each candidate by the family's own rule. Either way the candidates within a
proven bound of the best are re-scored by the reference computation (:class:`ReconstructionError`,
dense routing as the family computes it in float32, the search before issue #16), ties within its
rounding on its own batches, and the first with the least reference error in enumeration order is
kept: the choice the reference search makes (docs/naee.md).

Exhaustive over all C(E, K) subsets up to ``max_subsets`` (per routing group when the family routes
within groups), greedy elimination (drop, one at a time, the expert whose removal hurts least)
beyond. The layer's plan records how many subsets were evaluated and how long it took.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from pydantic import Field

from moeshrink.arch import MoELayer
from moeshrink.arch.base import ScoringRule
from moeshrink.arch.routing import softmax_topk, topk_softmax
from moeshrink.engine.observers import INPUTS, LOGITS, LayerStats
from moeshrink.methods.base import ExpertMethod, LayerBudget
from moeshrink.methods.options import MethodOptions
from moeshrink.plan import LayerPlan
from moeshrink.surgery import set_top_k

# Relative error of the float32 routing weights the reference computes (softmax, top-k,
# renormalisation: a few roundings of 2^-24 each), with a wide margin.
WEIGHT_EPS = 1e-5
# (candidate, token) pairs scored at once: each [B, T] float64 intermediate stays under 32 MiB.
PAIRS_PER_CHUNK = 1 << 22


def route_batch(
    layer: MoELayer, logits: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing of ``logits [T, E]`` under ``B`` masks ``allowed [B, E]``: weights and
    expert indices, each ``[B, T, k]`` (weights float32, as the family computes them)."""
    b, (t, e) = allowed.shape[0], logits.shape
    flat_logits = logits.unsqueeze(0).expand(b, t, e).reshape(b * t, e)
    flat_allowed = allowed.unsqueeze(1).expand(b, t, e).reshape(b * t, e)
    weights, index = layer.route(flat_logits, flat_allowed)
    return weights.cpu().reshape(b, t, -1), index.cpu().reshape(b, t, -1)


def dense_routing(layer: MoELayer, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Routing weights ``[B, T, E]`` (zero for unchosen experts) for ``B`` masks ``allowed [B, E]``."""
    weights, index = route_batch(layer, logits, allowed)
    b, t, e = allowed.shape[0], logits.shape[0], logits.shape[1]
    dense = torch.zeros(b * t, e, dtype=torch.float64)
    dense.scatter_add_(1, index.reshape(b * t, -1), weights.double().reshape(b * t, -1))
    return dense.reshape(b, t, e)


def expert_grams(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices ``[T, E, E]`` (float64) of every expert's output on ``hidden [T, H]``."""
    num_experts, tokens = layer.num_experts, hidden.shape[0]
    chunk = max(1, (1 << 27) // (num_experts * hidden.shape[1] * 8))  # expert outputs held: <= 128 MiB
    grams = []
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
    return torch.cat(grams)


class ReconstructionError:
    """The reference: squared error of the layer's routed output for kept subsets, from the dense
    routing weights the family computes (``O(T E^2)`` per subset)."""

    def __init__(self, layer: MoELayer, logits: torch.Tensor, gram: torch.Tensor):
        self.layer, self.logits, self.gram = layer, logits.float(), gram
        num_experts, tokens = layer.num_experts, gram.shape[0]
        # Candidates scored at once: their dense routing weights [B, T, E] stay under ~256 MiB.
        self.batch = max(1, (1 << 25) // (tokens * num_experts))
        self.full = dense_routing(layer, self.logits, torch.ones(1, num_experts, dtype=torch.bool))[0]

    def __call__(self, allowed: torch.Tensor) -> torch.Tensor:
        """Errors ``[B]`` of the masks ``allowed [B, E]``."""
        out = []
        for start in range(0, allowed.shape[0], self.batch):
            diff = dense_routing(self.layer, self.logits, allowed[start : start + self.batch]) - self.full
            out.append(torch.einsum("bte,tef,btf->b", diff, self.gram, diff))
        return torch.cat(out)


class SubsetErrors:
    """Squared error of the layer's routed output for kept subsets, ``k^2 + k`` numbers per token and
    subset (see the module docstring), and the reference's choice among near-ties."""

    def __init__(self, layer: MoELayer, hidden: torch.Tensor, logits: torch.Tensor):
        self.gram = expert_grams(layer, hidden)  # [T, E, E]
        self.reference = ReconstructionError(layer, logits, self.gram)
        self.layer, self.logits, self.full = layer, self.reference.logits, self.reference.full
        tokens, e = self.gram.shape[:2]
        self.top_k = layer.top_k
        self.cross = torch.einsum("tef,tf->te", self.gram, self.full)  # (G_t w_t)[e] = <y_e, Z_t>
        self.energy_per_token = torch.einsum("te,te->t", self.full, self.cross)  # ||Z_t||^2
        self.energy = float(self.energy_per_token.sum())
        # Sum over tokens of the largest squared expert output norm: bounds a weight error's effect.
        self.output_scale = float(torch.diagonal(self.gram, dim1=1, dim2=2).amax(dim=1).sum())
        # Bound on float64 rounding of any error, here or in the reference, however batched.
        self.rounding = 1e-9 * (self.energy + self.output_scale)
        self.evaluated = 0
        rule = layer.scoring
        self.by_rank = rule in (softmax_topk, topk_softmax) and e <= 52
        # Tokens routed by the family's rule for every candidate: all of them, or on the rank path those
        # with two equal logits (frequent with a bfloat16 router), whose order top-k breaks its own way,
        # or two so close that their float32 probabilities may round equal.
        self.routed = torch.arange(tokens)
        if self.by_rank:
            ordered = torch.sort(self.logits, dim=1, descending=True, stable=True)
            high, low = ordered.values[:, :-1], ordered.values[:, 1:]
            tied = (high - low <= 1e-6 * (1 + high.abs())).any(dim=1)
            self.routed, free = torch.nonzero(tied).flatten(), torch.nonzero(~tied).flatten()
            self._rank_tables(free, ordered.indices[free], rule)
        r = self.routed
        self.routed_tables = (self.gram[r], self.cross[r], self.energy_per_token[r])
        self.routed_logits = self.logits[r]
        self.batch = max(1, PAIRS_PER_CHUNK // tokens)

    def _rank_tables(self, free: torch.Tensor, order: torch.Tensor, rule: ScoringRule) -> None:
        """Tables of the tokens ``free`` (no two equal logits) indexed by each token's rank order
        ``order [T', E]`` (experts by descending logit) instead of the expert index."""
        tokens, e = order.shape
        rank = torch.argsort(order, dim=1)
        self.rank_bits = torch.ldexp(torch.ones(tokens, e, dtype=torch.float64), rank.double()).T
        if e <= 24:
            self.rank_bits = self.rank_bits.float()  # sums of distinct powers below 2^24: exact
        logits = self.logits[free].double()
        top = logits.gather(1, order[:, :1])
        self.exp_by_rank = torch.exp(logits.gather(1, order) - top)  # [T', E]
        self.renormalise = rule is topk_softmax or getattr(self.layer.router, "norm_topk_prob", True)
        self.exp_by_expert = torch.exp(logits - top).T  # [E, T']: softmax denominators over S
        rows = torch.arange(tokens)[:, None, None]
        self.rank_gram = self.gram[free][rows, order[:, :, None], order[:, None, :]]
        self.rank_cross = self.cross[free].gather(1, order)
        self.rank_energy = self.energy_per_token[free]
        self.table = None
        if self.renormalise and self.top_k <= 2:
            self.table = self._rank_table().reshape(tokens, e**self.top_k).T.contiguous()  # [E^k, T']
            # E <= 16: the offset of each subset's rank tuple, looked up from its rank bits
            self.lookup = _rank_tuple_offsets(e, self.top_k) if e <= 16 else None

    def _rank_table(self) -> torch.Tensor:
        """Each free token's error when it routes to the experts of ranks ``(r1, ..., rk)`` (k <= 2,
        weights renormalised over them): ``[T', E]`` or ``[T', E, E]`` (entries with r1 >= r2 unused)."""
        diag = torch.diagonal(self.rank_gram, dim1=1, dim2=2)
        zz, cross, a = self.rank_energy, self.rank_cross, self.exp_by_rank
        if self.top_k == 1:
            return zz[:, None] - 2 * cross + diag
        w1 = a[:, :, None] / (a[:, :, None] + a[:, None, :])
        w2 = a[:, None, :] / (a[:, :, None] + a[:, None, :])
        error = zz[:, None, None] - 2 * w1 * cross[:, :, None] - 2 * w2 * cross[:, None, :]
        return error + w1 * w1 * diag[:, :, None] + w2 * w2 * diag[:, None, :] + 2 * w1 * w2 * self.rank_gram

    def __call__(self, allowed: torch.Tensor) -> torch.Tensor:
        """Errors ``[B]`` of the masks ``allowed [B, E]`` (float64; equal to the reference's up to
        rounding and, on the rank path, float32 rounding of the routing weights)."""
        out = [self._chunk(allowed[s : s + self.batch]) for s in range(0, allowed.shape[0], self.batch)]
        self.evaluated += allowed.shape[0]
        return torch.cat(out)

    def _chunk(self, allowed: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(allowed.shape[0], dtype=torch.float64)
        if len(self.routed):
            w, index = route_batch(self.layer, self.routed_logits, allowed)
            chosen, weights = list(index.unbind(-1)), list(w.double().unbind(-1))
            total += _quadratic(*self.routed_tables, chosen, weights)
        if self.by_rank and self.rank_bits.shape[1]:
            total += self._rank_chunk(allowed)
        return total

    def _rank_chunk(self, allowed: torch.Tensor) -> torch.Tensor:
        e, tokens = self.rank_bits.shape
        # [B, T']: bit r set = the token's rank-r expert is allowed
        bits = (allowed.to(self.rank_bits.dtype) @ self.rank_bits).long()
        if self.table is not None:
            if self.lookup is not None:
                offset = self.lookup.take(bits)
            else:
                offset = sum(r * e**i for i, r in enumerate(reversed(_lowest_set_bits(bits, self.top_k))))
            table = self.table.unsqueeze(0).expand(allowed.shape[0], -1, -1)
            return table.gather(1, offset.unsqueeze(1)).sum(dim=(1, 2))
        chosen = _lowest_set_bits(bits, self.top_k)
        values = [self.exp_by_rank.view(-1).take(c + torch.arange(tokens) * e) for c in chosen]
        total = sum(values) if self.renormalise else allowed.double() @ self.exp_by_expert
        weights = [v / total for v in values]
        return _quadratic(self.rank_gram, self.rank_cross, self.rank_energy, chosen, weights)

    def choose(
        self,
        order: list[int],
        allowed: torch.Tensor,
        errors: torch.Tensor,
        batch_of: Callable[[int], tuple[int, torch.Tensor]],
    ) -> tuple[int, float]:
        """The reference search's choice: the first candidate, in enumeration order, with the least
        reference error, as the reference computes it batch by batch.

        ``order`` are the candidates' places in the enumeration, ``allowed [B, E]`` their masks and
        ``errors [B]`` their errors here, every candidate within :meth:`tolerance` of the least
        included. They are re-scored by the reference; when more than one lies within the
        reference's own rounding of the least, the reference batches that hold them
        (``batch_of(i)``: the first place and the masks of the i-th batch of ``reference.batch``
        candidates) are re-scored whole, so that a tie is broken on the very numbers the reference
        search compared. Returns the winner's place and reference error."""
        exact = self.reference(allowed)
        least = float(exact.min())
        tied = torch.nonzero(exact <= least + 2 * self.rounding).flatten().tolist()
        if len(tied) == 1:
            return order[tied[0]], float(exact[tied[0]])
        best, place = math.inf, -1
        for batch in sorted({order[i] // self.reference.batch for i in tied}):
            start, masks = batch_of(batch)
            values = self.reference(masks)
            i = int(values.argmin())
            if float(values[i]) < best:
                best, place = float(values[i]), start + i
        return place, best

    def tolerance(self, best: float) -> float:
        """How far a candidate's error here may lie above the least and still be the reference's least.

        Both may differ from the reference by float64 rounding of sums of magnitude ``energy`` and, on
        the rank path, by the reference's float32 weights: a relative weight error ``eps`` moves
        ``Z'_t`` by at most ``eps max_e ||y_te||`` (the weights sum to at most 1), so the error by at
        most ``2 eps sqrt(err Y) + eps^2 Y`` with ``Y`` the sum over tokens of the largest
        ``||y_te||^2``. Taken twice (for the least and for the reference's choice), doubled again."""
        if not self.by_rank:
            return 2 * self.rounding
        eps, scale = WEIGHT_EPS, self.output_scale
        drift = 2 * eps * math.sqrt(max(best + eps * scale, 0.0) * scale) + eps * eps * scale
        return 4 * drift + 2 * self.rounding


def _quadratic(
    gram: torch.Tensor,
    cross: torch.Tensor,
    energy: torch.Tensor,
    chosen: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_t ||Z_t - sum_i w_i y_{c_i}||^2`` per candidate ``[B]``, from ``gram [T, E, E]``
    (``y_e . y_f``), ``cross [T, E]`` (``y_e . Z_t``) and ``energy [T]`` (``Z_t . Z_t``); ``chosen``
    and ``weights``: k tensors ``[B, T]`` (indices into the tables' E axis, and weights)."""
    tokens, e = cross.shape
    base = torch.arange(tokens) * e
    gram, cross = gram.reshape(-1), cross.reshape(-1)
    rows = [(c + base) * e for c in chosen]
    error = energy.expand_as(weights[0]).clone()
    for i, (ci, wi) in enumerate(zip(chosen, weights, strict=True)):
        error -= 2 * wi * cross.take(ci + base)
        error += wi * wi * gram.take(rows[i] + ci)
        for j in range(i + 1, len(chosen)):
            error += 2 * wi * weights[j] * gram.take(rows[i] + chosen[j])
    return error.sum(dim=1)


def _lowest_set_bits(bits: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Positions of the ``k`` lowest set bits of each entry of ``bits`` (int64), lowest first."""
    out = []
    for _ in range(k):
        low = bits & -bits
        out.append(torch.frexp(low.double()).exponent.long() - 1)
        bits = bits ^ low
    return out


def _rank_tuple_offsets(e: int, k: int) -> torch.Tensor:
    """For every ``e``-bit value with at least ``k`` bits set, ``sum_i r_i e^(k-1-i)`` over its ``k``
    lowest set bits ``r_1 < ... < r_k``: the offset of that rank tuple in a ``[E] * k`` table."""
    ranks = _lowest_set_bits(torch.arange(1 << e), k)
    return sum(r * e**i for i, r in enumerate(reversed(ranks)))


def _masks(subsets: list[tuple[int, ...]], num_experts: int) -> torch.Tensor:
    mask = torch.zeros(len(subsets), num_experts, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        mask[row, list(subset)] = True
    return mask


def exhaustive_subsets(e: int, groups: int, per_group: int) -> Iterator[tuple[int, ...]]:
    """Every kept subset, ``per_group`` experts of each of ``groups`` equal groups, in the search's
    enumeration order (lexicographic within groups, the last group fastest)."""
    size = e // groups
    per = [list(itertools.combinations(range(g * size, (g + 1) * size), per_group)) for g in range(groups)]
    return (sum(parts, ()) for parts in itertools.product(*per))


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
        error = SubsetErrors(
            layer,
            stats.inputs[: self.settings.max_tokens].to(device, layer.router.weight.dtype),
            stats.logits[: self.settings.max_tokens],
        )
        e, k = layer.num_experts, budget.keep
        size, per_group = e // budget.groups, k // budget.groups
        combos = math.comb(size, per_group) ** budget.groups
        if combos <= self.settings.max_subsets:
            kept, best = exhaustive(error, e, budget.groups, per_group)
            search = "exhaustive"
        else:
            kept, best = greedy(error, e, budget.groups, per_group)
            search = "greedy"
        plan = LayerPlan.keep(layer.index, e, kept)
        plan.details = {
            "search": search,
            "subsets_evaluated": error.evaluated,
            "subsets_possible": combos,
            "tokens": int(error.full.shape[0]),
            "error": best,
            "relative_error": best / max(error.energy, 1e-30),
            "seconds": time.perf_counter() - start,
        }
        return plan


def exhaustive(error: SubsetErrors, e: int, groups: int, per_group: int) -> tuple[list[int], float]:
    """The kept experts of the subset with the least error, and its error. Subsets are scored in
    chunks; only those within :meth:`SubsetErrors.tolerance` of the least so far are kept for the
    final choice (the bound only grows with the least error, so none of the final near-ties is lost)."""
    subsets = exhaustive_subsets(e, groups, per_group)
    near: list[int] = []  # places in the enumeration
    near_subsets: list[tuple[int, ...]] = []
    near_errors = torch.zeros(0, dtype=torch.float64)
    least, start = math.inf, 0
    while chunk := list(itertools.islice(subsets, 4 * error.batch)):
        errors = error(_masks(chunk, e))
        least = min(least, float(errors.min()))
        keep = torch.nonzero(errors <= least + error.tolerance(least)).flatten().tolist()
        near += [start + i for i in keep]
        near_subsets += [chunk[i] for i in keep]
        near_errors = torch.cat([near_errors, errors[keep]])
        keep = torch.nonzero(near_errors <= least + error.tolerance(least)).flatten().tolist()
        near, near_subsets = [near[i] for i in keep], [near_subsets[i] for i in keep]
        near_errors = near_errors[keep]
        start += len(chunk)

    def batch_of(i: int) -> tuple[int, torch.Tensor]:
        size = error.reference.batch
        chunk = itertools.islice(exhaustive_subsets(e, groups, per_group), i * size, (i + 1) * size)
        return i * size, _masks(list(chunk), e)

    place, best = error.choose(near, _masks(near_subsets, e), near_errors, batch_of)
    subset = (
        near_subsets[near.index(place)]
        if place in near
        else next(itertools.islice(exhaustive_subsets(e, groups, per_group), place, None))
    )
    return sorted(subset), best


def greedy(error: SubsetErrors, e: int, groups: int, per_group: int) -> tuple[list[int], float]:
    """Greedy elimination: drop, one at a time, the expert whose removal leaves the least error
    (ties: the lowest index), keeping ``per_group`` experts in each group. The kept experts and the
    last error."""
    size = e // groups
    kept = set(range(e))
    best = 0.0
    while len(kept) > per_group * groups:
        removable = [j for j in sorted(kept) if sum(1 for i in kept if i // size == j // size) > per_group]
        masks = _masks([tuple(sorted(kept - {j})) for j in removable], e)
        errors = error(masks)
        near = torch.nonzero(errors <= float(errors.min()) + error.tolerance(float(errors.min())))
        near = near.flatten().tolist()

        def batch_of(i: int, masks: torch.Tensor = masks) -> tuple[int, torch.Tensor]:
            size = error.reference.batch
            return i * size, masks[i * size : (i + 1) * size]

        place, best = error.choose(near, masks[near], errors[near], batch_of)
        kept.remove(removable[place])
    return sorted(kept), best
