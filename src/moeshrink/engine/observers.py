"""Per-layer statistics collected by hooks during the calibration pass.

Every statistic is kept as a sum (or a bounded sample), so statistics from several processes can be
added together. A method declares which ones it needs; the rest are not computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeshrink.arch import MoELayer, split_router_output

COUNTS = "counts"  # top-k selection counts [E]; always collected (cheap)
SOFT_MASS = "soft_mass"  # sum of router probabilities over tokens [E]
LOGITS = "logits"  # a sample of router logits [T, E]
COACTIVATION = "coactivation"  # how often experts i and j are chosen for the same token [E, E]
EXPERT_NORMS = "expert_norms"  # sum of ||E_j(x)|| and g_j(x)*||E_j(x)|| over tokens routed to j [E]
INPUTS = "inputs"  # a sample of the MoE layer's input hidden states [T, H], the same tokens as LOGITS
# sum over all tokens of every expert's output E_j(x) [E, H] (E x the MoE FLOPs)
MEAN_OUTPUTS = "mean_outputs"
# Wanda: sum over the tokens routed to expert j of x^2 per input column, for the gate/up input [E, H]
# and for the down projection's input (the intermediate activation) [E, I]
INPUT_NORMS = "input_norms"
# a copy of the router's rows [E, H] (no forward pass): for planning after the layer is gone (streaming)
ROUTER = "router"
STATISTICS = frozenset(
    {COUNTS, SOFT_MASS, LOGITS, COACTIVATION, EXPERT_NORMS, INPUTS, MEAN_OUTPUTS, INPUT_NORMS, ROUTER}
)


@dataclass
class LayerStats:
    """Sums over the calibration tokens of one MoE layer."""

    num_experts: int
    num_tokens: int = 0
    counts: torch.Tensor | None = None
    soft_mass: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    coactivation: torch.Tensor | None = None
    norm_sum: torch.Tensor | None = None
    gated_norm_sum: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    output_sum: torch.Tensor | None = None
    input_sq: torch.Tensor | None = None
    intermediate_sq: torch.Tensor | None = None
    router: torch.Tensor | None = None
    _logit_parts: list[torch.Tensor] = field(default_factory=list, repr=False)
    _input_parts: list[torch.Tensor] = field(default_factory=list, repr=False)

    def frequency(self) -> torch.Tensor:
        """Fraction of tokens that chose each expert."""
        return self.counts / max(self.num_tokens, 1)

    def mean_outputs(self) -> torch.Tensor:
        """Each expert's mean output over all calibration tokens, routed to it or not [E, H]."""
        return self.output_sum / max(self.num_tokens, 1)


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


class LayerObserver:
    """Hooks on one MoE layer's router and experts that accumulate :class:`LayerStats`.

    Use as a context manager around the forward passes of the layer. Expert output norms are
    computed on the routed (token, expert) pairs only, in one call to the experts module: one extra
    MoE forward's worth of FLOPs, not E times.
    """

    def __init__(self, layer: MoELayer, needs: frozenset[str] | set[str], max_sample_tokens: int = 16384):
        unknown = set(needs) - STATISTICS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
        self.layer = layer
        self.needs = set(needs) | {COUNTS}
        self.max_sample_tokens = max_sample_tokens
        self.stats = LayerStats(num_experts=layer.num_experts)
        self._handles: list = []

    def __enter__(self) -> LayerObserver:
        if ROUTER in self.needs:
            self.stats.router = self.layer.router.weight.detach().float().cpu().clone()
        self._handles.append(self.layer.router.register_forward_hook(self._on_router))
        if EXPERT_NORMS in self.needs or INPUT_NORMS in self.needs:
            self._handles.append(self.layer.experts.register_forward_hook(self._on_experts))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        s = self.stats
        if s._logit_parts:
            s.logits = torch.cat(s._logit_parts)
            s._logit_parts.clear()
        if s._input_parts:
            s.inputs = torch.cat(s._input_parts)
            s._input_parts.clear()

    @torch.no_grad()
    def _on_router(self, module, args, output) -> None:
        logits, _, index = split_router_output(output)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        index = index.reshape(logits.shape[0], -1)
        s, num_experts = self.stats, self.layer.num_experts
        s.num_tokens += logits.shape[0]
        chosen = torch.zeros(logits.shape[0], num_experts, dtype=torch.float64, device=logits.device)
        chosen.scatter_(1, index, 1.0)
        s.counts = _add(s.counts, chosen.sum(0))
        if SOFT_MASS in self.needs:
            s.soft_mass = _add(s.soft_mass, self.layer.probabilities(logits).double().sum(0))
        if COACTIVATION in self.needs:
            s.coactivation = _add(s.coactivation, chosen.T @ chosen)
        room = self.max_sample_tokens - sum(p.shape[0] for p in s._logit_parts)
        if room > 0 and (LOGITS in self.needs or INPUTS in self.needs):
            s._logit_parts.append(logits[:room].cpu())
            if INPUTS in self.needs:
                s._input_parts.append(args[0].reshape(-1, args[0].shape[-1])[:room].float().cpu())
        if MEAN_OUTPUTS in self.needs:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            total = torch.stack(
                [
                    self.layer.expert_outputs(hidden, torch.full((hidden.shape[0],), j, device=hidden.device))
                    .double()
                    .sum(0)
                    for j in range(num_experts)
                ]
            )
            s.output_sum = _add(s.output_sum, total)

    @torch.no_grad()
    def _on_experts(self, module, args, output) -> None:
        if INPUT_NORMS in self.needs:
            self._input_norms(*args[:2])
        if EXPERT_NORMS in self.needs:
            self._expert_norms(*args[:3])

    def _input_norms(self, hidden: torch.Tensor, index: torch.Tensor) -> None:
        s, n = self.stats, self.layer.num_experts
        if s.input_sq is None:
            s.input_sq = torch.zeros(n, hidden.shape[-1], dtype=torch.float64, device=hidden.device)
            s.intermediate_sq = torch.zeros(
                n, self.layer.intermediate_size, dtype=torch.float64, device=hidden.device
            )
        for j in index.unique().tolist():
            rows = (index == j).any(dim=-1)
            x = hidden[rows]
            s.input_sq[j] += x.double().pow(2).sum(0)
            s.intermediate_sq[j] += self.layer.intermediate(x, j).double().pow(2).sum(0)

    def _expert_norms(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        k = index.shape[-1]
        pairs_hidden = hidden.repeat_interleave(k, dim=0)
        flat_index = index.reshape(-1)
        norms = self.layer.expert_outputs(pairs_hidden, flat_index).float().norm(dim=-1).double()
        gates = weights.reshape(-1).double()
        s, n = self.stats, self.layer.num_experts
        zeros = torch.zeros(n, dtype=torch.float64, device=norms.device)
        s.norm_sum = _add(s.norm_sum, zeros.index_add(0, flat_index, norms))
        s.gated_norm_sum = _add(s.gated_norm_sum, zeros.index_add(0, flat_index, gates * norms))


class LinearInputObserver:
    """Pre-hooks on plain linear layers that sum each input feature squared over every token (the
    input norms Wanda needs for attention projections, shared experts and dense MLPs)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sq_norms: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LinearInputObserver:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        @torch.no_grad()
        def hook(module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sq_norms[name] = _add(self.sq_norms.get(name), x.pow(2).sum(0))

        return hook
