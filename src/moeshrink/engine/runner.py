"""The layer-wise calibration runner (SparseGPT / Wanda / llm-compressor style).

Embed the calibration batches once, then for each decoder layer: run it with observers attached,
let the method plan the layer from the statistics, apply the plan, and re-run the compressed layer
to produce the next layer's inputs (error propagation, on by default). Only one decoder layer is on
``device`` at a time; the model itself stays where it was loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.engine.distributed import reduce_stats, reduce_sums
from moeshrink.engine.observers import LayerObserver, LayerStats, LinearInputObserver
from moeshrink.engine.offload import LayerHooks, SpilledBatches
from moeshrink.plan import LayerPlan
from moeshrink.surgery import set_top_k


@dataclass
class LayerInputs:
    """Cached inputs of the current decoder layer: hidden states per batch and each layer's keyword
    arguments (masks and position embeddings differ per layer in some families, e.g. sliding windows)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]


def move_to_device(value, device):
    """``value`` (a tensor, or tuples and dicts of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    hidden_store: SpilledBatches | None = None,
) -> LayerInputs:
    """Run the embedding and record what every decoder layer is called with, without running the layers
    (the first layer's hidden states go to ``hidden_store`` when given, e.g. spilled to disk)."""
    layers = adapter.decoder_layers(model)
    base = model.model
    records: list[list[dict]] = [[] for _ in layers]
    hidden: list[torch.Tensor] | SpilledBatches = [] if hidden_store is None else hidden_store

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
    """The layer's outputs for every cached batch (spilled to disk when the inputs are)."""
    outputs = hidden.empty_like() if isinstance(hidden, SpilledBatches) else []
    for states, kw in zip(hidden, kwargs, strict=True):
        out = decoder_layer(states, **kw)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


# Plans one MoE layer from its statistics and applies the plan to it; returns the plan.
CompressLayer = Callable[[MoELayer, "LayerStats | None"], LayerPlan]


def _no_linears(decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
    return {}


@dataclass
class SparsifyStep:
    """Weight sparsification of each decoder layer, run right after its experts are compressed.

    ``apply(index, decoder_layer, moe, stats, linear_norms)`` prunes in place (and records what it
    did itself). ``needs`` are the MoE statistics it reads; ``linears``
    names the plain linear layers whose input norms it reads (``{}``: none). With ``dense_layers`` the
    decoder layers without routed experts are visited too (``moe`` is then None).
    """

    apply: Callable[[int, nn.Module, MoELayer | None, LayerStats | None, dict[str, torch.Tensor]], None]
    needs: frozenset[str] = frozenset()
    linears: Callable[[nn.Module, MoELayer | None], dict[str, nn.Module]] = _no_linears
    dense_layers: bool = False


def _sparsify(
    step: SparsifyStep,
    index: int,
    decoder_layer: nn.Module,
    moe: MoELayer | None,
    data: tuple[list[torch.Tensor], list[dict]] | None,
) -> None:
    """Collect what ``step`` needs by running the layer over ``data`` (if any), then apply it."""
    linears = step.linears(decoder_layer, moe)
    needs = step.needs if moe is not None else frozenset()
    if data is None or (not needs and not linears):
        step.apply(index, decoder_layer, moe, None, {})
        return
    linear_observer = LinearInputObserver(linears)
    if moe is not None:
        with LayerObserver(moe, needs) as observer, linear_observer:
            run_layer(decoder_layer, *data)
        reduce_stats(observer.stats, observer.max_sample_tokens)
        stats = observer.stats
    else:
        with linear_observer:
            run_layer(decoder_layer, *data)
        stats = None
    reduce_sums(linear_observer.sq_norms)
    step.apply(index, decoder_layer, moe, stats, linear_observer.sq_norms)


@torch.no_grad()
def compress_layerwise(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor | None,
    compress_layer: CompressLayer | None,
    needs: frozenset[str],
    top_k: int,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    error_propagation: bool = True,
    progress: bool = True,
    sparsify: SparsifyStep | None = None,
    layer_hooks: LayerHooks | None = None,
    offload_hidden: str | Path | None = None,
) -> list[LayerPlan]:
    """Compress every MoE layer in order with ``compress_layer`` (None: leave the experts as they are),
    then (optionally) sparsify the layer with statistics of its compressed form; returns the layer
    plans. With no statistics needed at all no forward pass is made."""
    device = torch.device(device)
    layers = adapter.decoder_layers(model)
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    plans: list[LayerPlan] = []
    visit_dense = sparsify is not None and sparsify.dense_layers
    last = len(layers) - 1 if visit_dense else max(moe_by_index)

    def compress(moe: MoELayer, stats: LayerStats | None) -> None:
        if compress_layer is not None:
            plans.append(compress_layer(moe, stats))
        set_top_k(moe, top_k)

    sparsify_wants_data = sparsify is not None and (
        bool(sparsify.needs)
        or any(sparsify.linears(layer, moe_by_index.get(i)) for i, layer in enumerate(layers))
    )
    if (not needs and not sparsify_wants_data) or input_ids is None:
        for index, decoder_layer in enumerate(layers[: last + 1]):
            moe = moe_by_index.get(index)
            if layer_hooks is not None:
                layer_hooks.load(index, decoder_layer)
            if moe is not None:
                compress(moe, None)
            if sparsify is not None and (moe is not None or visit_dense):
                _sparsify(sparsify, index, decoder_layer, moe, None)
            if layer_hooks is not None:
                layer_hooks.release(index, decoder_layer)
        return plans

    home = next(model.parameters()).device
    store = None if offload_hidden is None else SpilledBatches(offload_hidden, device)
    cached = capture_layer_inputs(model, adapter, input_ids, batch_size, device, store)
    hidden = cached.hidden
    bar = tqdm(list(enumerate(layers)), desc="calibrate+compress", unit="layer", disable=not progress)
    for index, decoder_layer in bar:
        if index > last:
            break
        if layer_hooks is not None:
            layer_hooks.load(index, decoder_layer)
        decoder_layer.to(device)
        kwargs = [move_to_device(kw, device) for kw in cached.layer_kwargs[index]]
        moe = moe_by_index.get(index)
        outputs = None  # the layer's outputs before it is changed
        stats = None
        if moe is not None and needs:
            with LayerObserver(moe, needs) as observer:
                outputs = run_layer(decoder_layer, hidden, kwargs)
            reduce_stats(observer.stats, observer.max_sample_tokens)
            stats = observer.stats
        elif not error_propagation:
            outputs = run_layer(decoder_layer, hidden, kwargs)
        if moe is not None:
            compress(moe, stats)
        sparsified = sparsify is not None and (moe is not None or visit_dense)
        if sparsified:
            _sparsify(sparsify, index, decoder_layer, moe, (hidden, kwargs))
        if index < last:
            changed = sparsified or (moe is not None and compress_layer is not None)
            if outputs is None or (error_propagation and changed):
                outputs = run_layer(decoder_layer, hidden, kwargs)
            hidden = outputs
        decoder_layer.to(home)
        if layer_hooks is not None:
            layer_hooks.release(index, decoder_layer)
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
    layer_hooks: LayerHooks | None = None,
) -> dict[int, LayerStats]:
    """Statistics of every MoE layer of the unmodified model, one layer at a time (no compression).
    ``layer_hooks`` materialise each decoder layer before and free it after (streaming)."""
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
        if layer_hooks is not None:
            layer_hooks.load(index, decoder_layer)
        decoder_layer.to(device)
        kwargs = [move_to_device(kw, device) for kw in cached.layer_kwargs[index]]
        if index in moe_by_index:
            with LayerObserver(moe_by_index[index], needs) as observer:
                hidden = run_layer(decoder_layer, hidden, kwargs)
            reduce_stats(observer.stats, observer.max_sample_tokens)
            stats[index] = observer.stats
        else:
            hidden = run_layer(decoder_layer, hidden, kwargs)
        decoder_layer.to(home)
        if layer_hooks is not None:
            layer_hooks.release(index, decoder_layer)
    return stats
