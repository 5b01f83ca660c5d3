"""The uniform view of one MoE layer, whatever the model family.

transformers 5.x keeps a layer's experts fused in one module (``experts.gate_up_proj [E, ...]``,
``experts.down_proj [E, ...]``) behind a router module that returns
``(router_logits, top_k_weights, top_k_index)`` (GraniteMoE up to transformers 5.19 returns them in
the reverse order: :func:`split_router_output` reads either). A family adapter says where those modules are,
how the expert tensors are laid out, how the router scores experts, and which config keys hold
the expert count. Everything else in moeshrink talks to :class:`MoELayer`, never to a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

NeuronLayout = Literal["none", "plain", "halves", "interleaved"]


@dataclass(frozen=True)
class ExpertTensor:
    """How one fused expert tensor (expert index first) is laid out.

    ``neuron_dim`` is the axis of a single expert's tensor (expert dim removed) that runs over the
    intermediate neurons; ``layout`` says how neurons sit on it: ``plain`` (one slot per neuron),
    ``halves`` (gate neurons then up neurons, ``[gate; up]``), ``interleaved`` (gate0, up0, gate1,
    ...), or ``none`` (no neuron axis, e.g. the down-projection bias).
    """

    name: str
    neuron_dim: int | None
    layout: NeuronLayout

    def neuron_index(self, perm: torch.Tensor) -> torch.Tensor | None:
        """Index along ``neuron_dim`` that applies the neuron permutation ``perm``."""
        if self.layout == "none":
            return None
        if self.layout == "plain":
            return perm
        if self.layout == "halves":
            return torch.cat([perm, perm + perm.numel()])
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)


RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_router_output(output: RouterOutput) -> RouterOutput:
    """A router's ``(logits, top_k_weights, top_k_index)``, whichever order it returned them in: the
    index is the integer tensor (GraniteMoE's router in transformers <= 5.19 returns it first)."""
    first, weights, last = output
    if first.is_floating_point():
        return first, weights, last
    return last, weights, first


def join_router_output(
    like: RouterOutput, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
) -> RouterOutput:
    """``(logits, weights, index)`` in the order of the router output ``like`` (see
    :func:`split_router_output`), for a forward that replaces the router's."""
    if like[0].is_floating_point():
        return logits, weights, index
    return index, weights, logits


# A scoring rule: router logits [T, E] (and a boolean mask of experts that may be chosen) ->
# (top_k_weights [T, k], top_k_index [T, k]), exactly as the family's router computes them.
ScoringRule = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MoELayer:
    """One decoder layer's routed experts: router, fused expert tensors, shared experts, top-k."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    expert_tensors: tuple[ExpertTensor, ...]
    scoring: ScoringRule
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    shared_modules: tuple[nn.Module, ...] = field(default_factory=tuple)

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def hidden_size(self) -> int:
        return int(self.router.weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        first = self.expert_tensors[0]
        size = self.param(first.name).shape[1 + first.neuron_dim]
        return size if first.layout == "plain" else size // 2

    def param(self, name: str) -> nn.Parameter:
        return getattr(self.experts, name)

    def router_tensors(self) -> dict[str, torch.Tensor]:
        """Router tensors with one row per expert: weight, and bias / correction bias where present."""
        out = {"weight": self.router.weight}
        for name in ("bias", "e_score_correction_bias"):
            t = getattr(self.router, name, None)
            if isinstance(t, torch.Tensor):
                out[name] = t
        return out

    def route(
        self, logits: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's routing of ``logits`` [T, E]; experts where ``allowed`` is False are never chosen."""
        return self.scoring(self.router, logits, allowed)

    def expert_outputs(self, hidden: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """Output of expert ``expert_index[t]`` on ``hidden[t]`` (unweighted), through the model's own code,
        in the experts' dtype (statistics keep hidden states in float32; some checkpoints, DeepSeek-V3's,
        store the router in float32 and the experts in bfloat16)."""
        weight = self.param(self.expert_tensors[0].name)
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        # .forward skips module hooks, so observers on the experts module do not see these calls.
        return self.experts.forward(hidden, expert_index.reshape(-1, 1), ones)

    def expert_parameter_count(self) -> int:
        return sum(self.param(t.name).numel() for t in self.expert_tensors)

    def _spec(self, name: str) -> ExpertTensor | None:
        return next((t for t in self.expert_tensors if t.name == name), None)

    def neuron_features(self, expert: int) -> torch.Tensor:
        """Everything that belongs to each intermediate neuron of ``expert``, one row per neuron [I, F].

        Built from the specs, so it follows the neuron permutation of :meth:`ExpertTensor.neuron_index`:
        permuting ``expert`` by ``perm`` permutes these rows by ``perm``. A row is the concatenation,
        over every tensor with a neuron axis, of that neuron's slots (``plain``: slot n; ``halves``:
        slots n and n + I; ``interleaved``: slots 2n and 2n + 1), each slot flattened (a gate/up row,
        a down column, a bias entry). float32.
        """
        size = self.intermediate_size
        parts = []
        for spec in self.expert_tensors:
            if spec.layout == "none" or spec.neuron_dim is None:
                continue
            t = self.param(spec.name).detach()[expert].float().movedim(spec.neuron_dim, 0)
            t = t.reshape(t.shape[0], -1)  # [slots, rest]
            if spec.layout == "halves":
                t = torch.cat([t[:size], t[size:]], dim=1)
            elif spec.layout == "interleaved":
                t = t.reshape(size, -1)  # rows 2n, 2n + 1 are consecutive
            parts.append(t)
        return torch.cat(parts, dim=1)

    def intermediate(self, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """The intermediate activation [T, I] of ``expert`` on ``hidden`` [T, H]: the input of its down
        projection, through the model's own gating (``experts._apply_gate``, which transformers attaches
        to every experts class; GPT-OSS has its own, with clamping on interleaved columns)."""
        spec = self._spec("gate_up_proj")
        if spec is None:
            raise ValueError(
                f"layer {self.index}: no gate_up_proj tensor to compute intermediate activations"
            )
        weight = self.param(spec.name).detach()[expert]
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            # neuron axis first: [2I, H] (nn.Linear layout); neuron axis last: transposed [H, 2I].
            out = torch.nn.functional.linear(hidden, weight) if spec.neuron_dim == 0 else hidden @ weight
            if self._spec("gate_up_proj_bias") is not None:
                out = out + self.param("gate_up_proj_bias").detach()[expert]
            return self.experts._apply_gate(out)
