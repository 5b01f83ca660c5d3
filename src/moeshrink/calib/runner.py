"""The layer-wise calibration runner (SparseGPT / Wanda / llm-compressor style).

Embed the calibration batches once, then for each decoder layer: run it with observers attached,
let the method plan the layer from the statistics, apply the plan, and re-run the compressed layer
to produce the next layer's inputs (error propagation, on by default). Only one decoder layer is on
``device`` at a time; the model itself stays where it was loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.calib.distributed import reduce_stats
from moeshrink.calib.observers import LayerObserver, LayerStats
from moeshrink.plan import LayerPlan
from moeshrink.surgery import set_top_k


@dataclass
class LayerInputs:
    """Cached inputs of the current decoder layer: hidden states per batch and each layer's keyword
    arguments (masks and position embeddings differ per layer in some families, e.g. sliding windows)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> LayerInputs:
    """Run the embedding and record what every decoder layer is called with, without running the layers."""
    layers = adapter.decoder_layers(model)
    base = model.model
    records: list[list[dict]] = [[] for _ in layers]
    hidden: list[torch.Tensor] = []

    def make_hook(i: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            states = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(states)
            records[i].append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})

        return hook

    home = next(model.parameters()).device
    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    movable = [m for name, m in base.named_children() if name not in ("layers", "norm")]
    for layer in layers:
        layer.forward = lambda hidden_states=None, *a, **k: hidden_states  # noqa: E731 (a pass-through)
    for m in movable:
        m.to(device)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            base(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward  # back to the class's forward
        for m in movable:
            m.to(home)
    return LayerInputs(hidden=hidden, layer_kwargs=records)


@torch.no_grad()
def run_layer(decoder_layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's outputs for every cached batch."""
    outputs = []
    for states, kw in zip(hidden, kwargs, strict=True):
        out = decoder_layer(states, **kw)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


# Plans one MoE layer from its statistics and applies the plan to it; returns the plan.
CompressLayer = Callable[[MoELayer, "LayerStats | None"], LayerPlan]
# Zeroes weights inside the (compressed) layer's experts from fresh statistics; returns what it did.
SparsifyLayer = Callable[[MoELayer, "LayerStats | None"], dict]


@torch.no_grad()
def compress_layerwise(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor | None,
    compress_layer: CompressLayer,
    needs: frozenset[str],
    top_k: int,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    error_propagation: bool = True,
    progress: bool = True,
    sparsify_layer: SparsifyLayer | None = None,
    sparsify_needs: frozenset[str] = frozenset(),
) -> list[LayerPlan]:
    """Compress every MoE layer in order with ``compress_layer``, then (optionally) sparsify inside
    its experts with statistics of the compressed layer; returns the layer plans.

    With no statistics needed at all no forward pass is made.
    """
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    plans: list[LayerPlan] = []
    if (not needs and not sparsify_needs) or input_ids is None:
        for moe in moe_by_index.values():
            plans.append(compress_layer(moe, None))
            set_top_k(moe, top_k)
            if sparsify_layer is not None:
                plans[-1].sparsity = sparsify_layer(moe, None)
        return plans

    home = next(model.parameters()).device
    cached = capture_layer_inputs(model, adapter, input_ids, batch_size, device)
    hidden = cached.hidden
    last_moe = max(moe_by_index)
    bar = tqdm(list(enumerate(layers)), desc="calibrate+compress", unit="layer", disable=not progress)
    for index, decoder_layer in bar:
        if index > last_moe:
            break
        decoder_layer.to(device)
        kwargs = [_move(kw, device) for kw in cached.layer_kwargs[index]]
        moe = moe_by_index.get(index)
        if moe is None:
            hidden = run_layer(decoder_layer, hidden, kwargs)
        else:
            with LayerObserver(moe, needs) as observer:
                outputs = run_layer(decoder_layer, hidden, kwargs)
            reduce_stats(observer.stats, observer.max_sample_tokens)
            plans.append(compress_layer(moe, observer.stats))
            set_top_k(moe, top_k)
            if sparsify_layer is not None:
                with LayerObserver(moe, sparsify_needs) as observer:
                    if sparsify_needs:
                        run_layer(decoder_layer, hidden, kwargs)
                reduce_stats(observer.stats, observer.max_sample_tokens)
                plans[-1].sparsity = sparsify_layer(moe, observer.stats if sparsify_needs else None)
            if index < last_moe:
                hidden = run_layer(decoder_layer, hidden, kwargs) if error_propagation else outputs
        decoder_layer.to(home)
    return plans


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    needs: frozenset[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, LayerStats]:
    """Statistics of every MoE layer of the unmodified model, one layer at a time (no compression)."""
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    home = next(model.parameters()).device
    cached = capture_layer_inputs(model, adapter, input_ids, batch_size, device)
    hidden, stats = cached.hidden, {}
    bar = tqdm(list(enumerate(layers)), desc="statistics", unit="layer", disable=not progress)
    for index, decoder_layer in bar:
        if index > max(moe_by_index):
            break
        decoder_layer.to(device)
        kwargs = [_move(kw, device) for kw in cached.layer_kwargs[index]]
        if index in moe_by_index:
            with LayerObserver(moe_by_index[index], needs) as observer:
                hidden = run_layer(decoder_layer, hidden, kwargs)
            reduce_stats(observer.stats, observer.max_sample_tokens)
            stats[index] = observer.stats
        else:
            hidden = run_layer(decoder_layer, hidden, kwargs)
        decoder_layer.to(home)
    return stats
