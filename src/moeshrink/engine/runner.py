"""The layer loop (SparseGPT / Wanda / llm-compressor's sequential pipeline).

Embed the calibration batches once, then for each decoder layer: for each step, run the layer with
the observers the step needs and apply the step; then re-run the changed layer to produce the next
layer's inputs (error propagation, on by default). Only one decoder layer is on ``device`` at a
time; the layer source (resident, or streamed from the shards) gives each layer and takes it back.

:func:`run_steps` runs a list of :mod:`steps <moeshrink.engine.steps>` in order: a step with a
global pass first has the steps before it applied, then a statistics-only pass over the model as
they left it, then is prepared from what that pass measured. Every pass is :func:`layer_pass`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.engine.distributed import reduce_stats, reduce_sums
from moeshrink.engine.observers import LayerObserver, LayerStats, LinearInputObserver
from moeshrink.engine.offload import LayerSource, ResidentLayers, SpilledBatches
from moeshrink.engine.steps import LayerStep, LayerView, MeasureStep
from moeshrink.errors import MoeShrinkError
from moeshrink.runtime import compute_dtype
from moeshrink.surgery.recover import snapshot


@dataclass
class LayerInputs:
    """Cached inputs of the current decoder layer: hidden states per batch and each layer's keyword
    arguments (masks and position embeddings differ per layer in some families, e.g. sliding windows)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]


def move_to_device(value, device, dtype: torch.dtype | None = None):
    """``value`` (a tensor, or tuples and dicts of them) on ``device``, its floating tensors in
    ``dtype`` when given."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: move_to_device(v, device, dtype) for k, v in value.items()}
    return value


def _layer_tensors(layer: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from layer.named_parameters()
    yield from layer.named_buffers()


def _to_compute(layer: nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """Move ``layer`` to ``device`` (and its floating tensors to ``dtype`` when given); returns each
    tensor's dtype before, for :func:`_to_home`."""
    before = {name: t.dtype for name, t in _layer_tensors(layer)}
    layer.to(device)
    if dtype is not None:
        layer.to(dtype)
    return before


def _to_home(
    layer: nn.Module, home: torch.device, before: dict[str, torch.dtype], dtype: torch.dtype
) -> None:
    """Undo :func:`_to_compute`: every tensor back to ``home`` in its own dtype from before (a float32
    router stays float32); a tensor a step created while the layer computed in another dtype is
    stored in ``dtype``, the model's."""
    layer.to(home)
    for name, tensor in _layer_tensors(layer):
        if not tensor.is_floating_point():
            continue
        wanted = before.get(name, dtype)
        if tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    hidden_store: SpilledBatches | None = None,
    dtype: torch.dtype | None = None,
) -> LayerInputs:
    """Run the embedding and record what every decoder layer is called with, without running the layers
    (the first layer's hidden states go to ``hidden_store`` when given, e.g. spilled to disk); floating
    inputs are kept in ``dtype`` when given."""
    layers = adapter.decoder_layers(model)
    base = model.model
    records: list[list[dict]] = [[] for _ in layers]
    hidden: list[torch.Tensor] | SpilledBatches = [] if hidden_store is None else hidden_store

    def make_hook(i: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            states = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(move_to_device(states, states.device, dtype))
            kept = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            records[i].append(move_to_device(kept, states.device, dtype))

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


@dataclass(frozen=True)
class _Action:
    """What a pass does at each layer: a step's apply (changes the layer) or its measure (does not)."""

    step: LayerStep
    measuring: bool

    def needs(self, moe: MoELayer | None) -> frozenset[str]:
        if moe is None:
            return frozenset()
        return self.step.global_needs if self.measuring else self.step.needs

    def linears(self, decoder_layer: nn.Module, moe: MoELayer | None) -> dict[str, nn.Module]:
        if self.measuring:
            return self.step.global_linears(decoder_layer, moe)
        return self.step.linears(decoder_layer, moe)

    def visits(self, moe: MoELayer | None) -> bool:
        return moe is not None or self.step.visits_dense

    def wants_data(self, decoder_layer: nn.Module, moe: MoELayer | None) -> bool:
        return self.visits(moe) and bool(self.needs(moe) or self.linears(decoder_layer, moe))

    def __call__(self, view: LayerView):
        return self.step.measure(view) if self.measuring else self.step.apply(view)


def observe(
    decoder_layer: nn.Module,
    moe: MoELayer | None,
    needs: frozenset[str],
    linears: dict[str, nn.Module],
    hidden: list[torch.Tensor],
    kwargs: list[dict],
) -> tuple[LayerStats | None, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run the layer over the cached batches with observers: the MoE statistics ``needs`` (None in a
    dense layer), the input norms of ``linears`` (reduced over ranks), and the layer's outputs."""
    linear_observer = LinearInputObserver(linears)
    stats = None
    if moe is not None:
        with LayerObserver(moe, needs) as observer, linear_observer:
            outputs = run_layer(decoder_layer, hidden, kwargs)
        reduce_stats(observer.stats, observer.max_sample_tokens)
        stats = observer.stats
    else:
        with linear_observer:
            outputs = run_layer(decoder_layer, hidden, kwargs)
    reduce_sums(linear_observer.sq_norms)
    return stats, linear_observer.sq_norms, outputs


@torch.no_grad()
def layer_pass(
    source: LayerSource,
    actions: Sequence[_Action],
    input_ids: torch.Tensor | None,
    *,
    write: bool,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    error_propagation: bool = True,
    progress: bool = True,
    desc: str = "layers",
    offload_hidden: str | Path | None = None,
) -> list[dict[int, object]]:
    """The one layer loop: visit the decoder layers in order and, at each, every action in turn
    (observing what it needs first, on the layer as the earlier actions left it). Returns each
    action's results by layer. With no statistics wanted (or no ``input_ids``) no forward pass is
    made. ``write``: the source writes each layer out when released (else it only frees it)."""
    device = torch.device(device)
    model, adapter = source.model, source.adapter
    layers = adapter.decoder_layers(model)
    moe_by_index = {m.index: m for m in adapter.moe_layers(model)}
    visited = [i for i in range(len(layers)) if any(a.visits(moe_by_index.get(i)) for a in actions)]
    results: list[dict[int, object]] = [{} for _ in actions]
    if not visited:
        return results
    last = max(visited)
    wants_data = input_ids is not None and any(
        a.wants_data(layers[i], moe_by_index.get(i)) for i in visited for a in actions
    )
    home = next(model.parameters()).device
    # half precision on a CPU without native arithmetic for it: each layer computes in float32 while it
    # is visited (see moeshrink.runtime.compute_dtype) and goes back to its own dtypes after
    compute = compute_dtype(model.dtype, device)
    upcast = compute if compute != model.dtype else None
    cached = hidden = None
    if wants_data:
        store = None if offload_hidden is None else SpilledBatches(offload_hidden, device)
        cached = capture_layer_inputs(model, adapter, input_ids, batch_size, device, store, upcast)
        hidden = cached.hidden
    bar = tqdm(layers[: last + 1], desc=desc, unit="layer", disable=not progress or not wants_data)
    for index, decoder_layer in enumerate(bar):
        moe = moe_by_index.get(index)
        source.load(index)
        kwargs = dtypes = None
        if wants_data:
            dtypes = _to_compute(decoder_layer, device, upcast)
            kwargs = [move_to_device(kw, device) for kw in cached.layer_kwargs[index]]
        outputs = None  # the layer's outputs before any action changed it
        changed = False
        mine = [(n, a) for n, a in enumerate(actions) if a.visits(moe)]
        original = None  # the MoE block before this pass changed it, for steps that compare with it
        if moe is not None and any(a.step.needs_original and not a.measuring for _, a in mine):
            original = snapshot(moe)
        earlier: dict[str, object] = {}
        if wants_data and not error_propagation and mine and not mine[0][1].wants_data(decoder_layer, moe):
            outputs = run_layer(decoder_layer, hidden, kwargs)
        for n, action in mine:
            view = LayerView(index, decoder_layer, moe, original=original, earlier=earlier)
            if wants_data and action.wants_data(decoder_layer, moe):
                needs, linears = action.needs(moe), action.linears(decoder_layer, moe)
                view.stats, view.linear_norms, observed = observe(
                    decoder_layer, moe, needs, linears, hidden, kwargs
                )
                if not changed:
                    outputs = observed
            results[n][index] = earlier[action.step.kind] = action(view)
            changed = changed or not action.measuring
        if wants_data and index < last:
            if outputs is None or (error_propagation and changed):
                outputs = run_layer(decoder_layer, hidden, kwargs)
            hidden = outputs
        if wants_data:
            _to_home(decoder_layer, home, dtypes, model.dtype)
        source.release(index, write=write)
    return results


@torch.no_grad()
def run_steps(
    source: LayerSource,
    steps: Sequence[LayerStep],
    input_ids: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    error_propagation: bool = True,
    progress: bool = True,
    offload_hidden: str | Path | None = None,
) -> tuple[list[LayerStep], list[dict[int, object]]]:
    """Apply ``steps`` in order to every layer of ``source``; returns the steps as prepared (after
    their global passes) and what each did, by layer.

    Steps with no global pass between them share one pass over the layers. A step with a global pass
    has the steps queued before it applied first, so its pass sees the model as they left it; a
    source that cannot keep changes between passes (streaming) refuses that order."""
    moe_layers = {m.index: m for m in source.adapter.moe_layers(source.model)}
    prepared: list[LayerStep] = []
    records: list[dict[int, object]] = []
    queued: list[LayerStep] = []
    settings = dict(device=device, batch_size=batch_size, error_propagation=error_propagation)

    def flush(write: bool) -> None:
        if queued and not write and not source.keeps_changes:
            raise MoeShrinkError(
                f"a '{queued[0].kind}' step before a step with a global pass needs the whole model in memory: "
                "run without --stream"
            )
        done = layer_pass(
            source,
            [_Action(s, measuring=False) for s in queued],
            input_ids,
            write=write,
            progress=progress,
            desc="calibrate+compress",
            offload_hidden=offload_hidden,
            **settings,
        )
        records.extend(done)
        queued.clear()

    for step in steps:
        step = step.resolve(prepared, source.model, source.adapter)
        if step.global_needs is not None:
            if queued:
                flush(write=False)
            (measures,) = layer_pass(
                source,
                [_Action(step, measuring=True)],
                input_ids,
                write=False,
                progress=progress,
                desc=f"{step.kind}: statistics",
                **settings,
            )
            step = step.prepare(measures, moe_layers)
        prepared.append(step)
        queued.append(step)
    counts = [s.expert_counts for s in prepared if s.expert_counts is not None]
    source.open_output(fused_experts=any(len(set(c.values())) > 1 for c in counts))
    flush(write=True)
    return prepared, records


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
    """Statistics of every MoE layer of the unmodified in-memory ``model`` (nothing is changed)."""
    (stats,) = layer_pass(
        ResidentLayers(model, adapter),
        [_Action(MeasureStep(frozenset(needs)), measuring=True)],
        input_ids,
        write=False,
        device=device,
        batch_size=batch_size,
        progress=progress,
        desc="statistics",
    )
    return stats
