"""Execute a :class:`~moeshrink.plan.LayerPlan` on a model in place.

Keeping a subset is an ``index_select`` of every fused expert tensor and every router row tensor
(bit-exact). Any other new expert is a weighted sum of neuron-permuted source experts, computed in
float32 and cast back; its router row is the plan's linear combination of the source rows.
"""

from __future__ import annotations

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.arch.base import ExpertTensor
from moeshrink.errors import MoeShrinkError
from moeshrink.plan import LayerPlan, ModelPlan, NewExpert


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def _merged_tensor(param: torch.Tensor, spec: ExpertTensor, expert: NewExpert) -> torch.Tensor:
    acc = torch.zeros(param.shape[1:], dtype=torch.float32, device=param.device)
    perms = expert.permutations or [None] * len(expert.sources)
    for source, weight, perm in zip(expert.sources, expert.weights, perms, strict=True):
        part = param[source].float()
        if perm is not None and spec.neuron_dim is not None:
            index = spec.neuron_index(torch.as_tensor(perm, device=param.device))
            part = part.index_select(spec.neuron_dim, index)
        acc += weight * part
    return acc.to(param.dtype)


def apply_layer_plan(layer: MoELayer, plan: LayerPlan) -> None:
    """Rebuild ``layer``'s experts and router rows as ``plan`` says (the config is updated separately)."""
    if plan.num_experts_before != layer.num_experts:
        raise MoeShrinkError(
            f"layer {layer.index}: the plan was made for {plan.num_experts_before} experts but the model has "
            f"{layer.num_experts}; apply a plan only to the checkpoint it was made from"
        )
    old_count, new_count = layer.num_experts, plan.num_experts_after
    with torch.no_grad():
        if all(e.is_plain_copy for e in plan.experts):
            device = layer.router.weight.device
            index = torch.tensor([e.sources[0] for e in plan.experts], device=device)
            for spec in layer.expert_tensors:
                param = layer.param(spec.name)
                _replace(layer.experts, spec.name, param.data.index_select(0, index.to(param.device)))
            for name, tensor in layer.router_tensors().items():
                _replace(
                    layer.router, name, tensor.data.index_select(0, index.to(tensor.device)).contiguous()
                )
        else:
            for spec in layer.expert_tensors:
                param = layer.param(spec.name)
                merged = torch.stack([_merged_tensor(param.data, spec, e) for e in plan.experts])
                _replace(layer.experts, spec.name, merged)
            for name, tensor in layer.router_tensors().items():
                mix = torch.zeros(new_count, old_count, dtype=torch.float32, device=tensor.device)
                for i, e in enumerate(plan.experts):
                    for source, w in zip(e.sources, e.router_weights, strict=True):
                        mix[i, source] += w
                flat = tensor.data.float().reshape(tensor.shape[0], -1)
                _replace(
                    layer.router, name, (mix @ flat).reshape(new_count, *tensor.shape[1:]).to(tensor.dtype)
                )
    for module in (layer.block, layer.router, layer.experts):
        if hasattr(module, "num_experts"):
            module.num_experts = new_count
    if hasattr(layer.router, "out_features"):
        layer.router.out_features = new_count


def write_refit(layer: MoELayer, plan: LayerPlan) -> None:
    """Overwrite the re-fitted tensors of new experts and their router rows (after :func:`apply_layer_plan`)."""
    expected = {f"{i}.{name}" for i, e in enumerate(plan.experts) for name in e.refit}
    if expected != set(plan.refit_tensors):
        raise MoeShrinkError(
            f"layer {plan.layer}: the plan re-fits {sorted(expected)} but {sorted(plan.refit_tensors)} were given; "
            "keep moeshrink_refit.safetensors next to moeshrink_plan.json"
        )
    with torch.no_grad():
        for key, tensor in plan.refit_tensors.items():
            index, name = key.split(".", 1)
            # "router.<name>": a router row (recovery); anything else: an expert tensor
            param = layer.router_tensors()[name[7:]] if name.startswith("router.") else layer.param(name)
            param.data[int(index)] = tensor.to(param.device, param.dtype)


def set_top_k(layer: MoELayer, top_k: int) -> None:
    """Change the active experts per token. The router copies ``num_experts_per_tok`` when it is built,
    so the config alone does nothing at run time; set it on the modules that hold it."""
    for module in (layer.block, layer.router):
        if hasattr(module, "top_k"):
            module.top_k = top_k


def apply_model_plan(model: nn.Module, adapter: FamilyAdapter, plan: ModelPlan) -> None:
    """Apply every layer plan, set top-k, and rewrite the config (all expert-count aliases)."""
    layers = {layer.index: layer for layer in adapter.moe_layers(model)}
    planned = {lp.layer for lp in plan.layers}
    if planned != set(layers):
        raise MoeShrinkError(
            f"the plan covers MoE layers {sorted(planned)} but the model has {sorted(layers)}; "
            "apply a plan only to the checkpoint it was made from"
        )
    for lp in plan.layers:
        apply_layer_plan(layers[lp.layer], lp)
        write_refit(layers[lp.layer], lp)
        set_top_k(layers[lp.layer], lp.top_k or plan.top_k)
    top_k = {lp.layer: lp.top_k or plan.top_k for lp in plan.layers}
    update_config(model, adapter, {lp.layer: lp.num_experts_after for lp in plan.layers}, top_k)


# Config field of a checkpoint whose MoE layers keep different numbers of experts: one entry per
# decoder layer, null for dense layers. Such checkpoints load with moeshrink.load_model (which
# resizes each layer before loading the weights); vLLM and SGLang need one count for all layers.
PER_LAYER_KEY = "moeshrink_experts_per_layer"
# Config field of a checkpoint whose MoE layers route to different numbers of experts per token
# (an EEP search over active experts): one entry per decoder layer. num_experts_per_tok holds the
# largest, which is what transformers and vLLM use everywhere; moeshrink.load_model sets each layer's.
TOP_K_PER_LAYER_KEY = "moeshrink_top_k_per_layer"


def update_config(
    model: nn.Module, adapter: FamilyAdapter, num_experts: int | dict[int, int], top_k: int | dict[int, int]
) -> None:
    """Rewrite every expert-count alias and ``num_experts_per_tok`` in the model's config. With
    different counts per layer (``{layer: count}``) the aliases hold the largest and the per-layer
    counts go to ``moeshrink_experts_per_layer``; likewise different top-k per layer go to
    ``moeshrink_top_k_per_layer`` and ``num_experts_per_tok`` holds the largest."""
    layers = len(adapter.decoder_layers(model))
    per_layer_top_k = top_k if isinstance(top_k, dict) and len(set(top_k.values())) > 1 else None
    if per_layer_top_k is not None:
        setattr(model.config, TOP_K_PER_LAYER_KEY, [per_layer_top_k.get(i) for i in range(layers)])
    elif hasattr(model.config, TOP_K_PER_LAYER_KEY):
        delattr(model.config, TOP_K_PER_LAYER_KEY)
    top_k = max(top_k.values()) if isinstance(top_k, dict) else top_k
    counts = num_experts if isinstance(num_experts, dict) else None
    if counts is not None and len(set(counts.values())) > 1:
        setattr(model.config, PER_LAYER_KEY, [counts.get(i) for i in range(layers)])
        num_experts = max(counts.values())
    else:
        num_experts = next(iter(counts.values())) if counts is not None else num_experts
        if hasattr(model.config, PER_LAYER_KEY):
            delattr(model.config, PER_LAYER_KEY)
    adapter.set_num_experts(model.config, num_experts)
    model.config.num_experts_per_tok = top_k
