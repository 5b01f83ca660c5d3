"""Each family's router scoring rule, re-stated so that routing can be recomputed over a subset of experts.

Every rule takes the router module (for its ``top_k`` and options), router logits ``[T, E]`` and an
optional boolean mask ``allowed [E]`` (False = the expert may not be chosen), and returns
``(top_k_weights [T, k], top_k_index [T, k])`` in float32. With ``allowed=None`` each rule equals the
family's own router output (tested in ``tests/test_arch.py``); with a mask it equals the router of
a model whose masked experts were removed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.phimoe.modeling_phimoe import sparsemixer

NEG_INF = float("-inf")


def _mask(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    return logits if allowed is None else logits.masked_fill(~allowed.to(logits.device), NEG_INF)


def softmax_topk(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None):
    """softmax over experts -> top-k -> renormalise when ``norm_topk_prob`` (Mixtral always does)."""
    probs = torch.softmax(_mask(logits, allowed), dim=-1)
    weights, index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def topk_softmax(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None):
    """top-k of the logits -> softmax over the k chosen (GraniteMoE, GPT-OSS)."""
    top_logits, index = torch.topk(_mask(logits, allowed), router.top_k, dim=-1)
    return torch.softmax(top_logits, dim=-1), index


def sigmoid_grouped_topk(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None):
    """DeepSeek-V3: sigmoid scores + correction bias, best ``topk_group`` groups, top-k, scaling factor.

    A masked expert is removed from the choice (its biased score is -inf), which is what a model
    without it computes when the same number of experts is removed from every group.
    """
    scores = logits.float().sigmoid()
    choice = scores + router.e_score_correction_bias.float()
    if allowed is not None:
        choice = choice.masked_fill(~allowed.to(choice.device), NEG_INF)
    num_experts = scores.shape[-1]
    grouped = choice.view(-1, router.num_group, num_experts // router.num_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_index = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1).bool()
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts)
    choice = choice.masked_fill(~expert_mask, NEG_INF)
    index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, index


def phimoe_sparsemixer(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None):
    """PhiMoE's sparsemixer in inference mode (always two experts)."""
    weights, index = sparsemixer(
        _mask(logits, allowed), jitter_eps=router.router_jitter_noise, training=False, top_k=router.top_k
    )
    return weights, index


def softmax_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().sigmoid()


def softmax_grouped_topk(router: nn.Module, logits: torch.Tensor, allowed: torch.Tensor | None = None):
    """DeepSeek-V2: softmax, greedy or group-limited greedy top-k, scaling factor, no renormalisation."""
    scores = torch.softmax(_mask(logits, allowed), dim=-1)
    if router.topk_method == "group_limited_greedy":
        num_experts = scores.shape[-1]
        grouped = scores.view(-1, router.num_group, num_experts // router.num_group)
        group_index = torch.topk(grouped.max(dim=-1).values, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros(grouped.shape[:2], device=scores.device).scatter_(1, group_index, 1).bool()
        scores = scores.masked_fill(
            ~group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts), 0.0
        )
    weights, index = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, index
