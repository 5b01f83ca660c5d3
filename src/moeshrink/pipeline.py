"""The main job: load -> calibrate -> plan -> apply -> export, with every input checked first."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moeshrink
from moeshrink.arch import FamilyAdapter, GroupedFamilyAdapter
from moeshrink.engine import distributed
from moeshrink.engine.data import build_calibration
from moeshrink.engine.runner import SparsifyStep, collect_layer_stats, compress_layerwise
from moeshrink.errors import MoeShrinkError
from moeshrink.info import ModelInfo, describe_model, meta_model
from moeshrink.io.checkpoint import (
    checkpoint_fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
)
from moeshrink.io.export import check_output_dir, export_checkpoint, load_plan
from moeshrink.io.streaming import (
    LayerStreamer,
    ShardReader,
    check_free_disk,
    choose_streaming,
    estimate_output_bytes,
)
from moeshrink.methods import LayerBudget, get_method
from moeshrink.plan import ModelPlan
from moeshrink.report.model_card import model_card
from moeshrink.sparsity.accounting import SparsityReport, count_sparsity
from moeshrink.sparsity.layer import (
    SparsitySpec,
    inside_sparsity,
    layer_outlier_fraction,
    parse_scope,
    scoped_linears,
    scoped_parameter_names,
    scoped_weight_count,
    sparsify_decoder_layer,
)
from moeshrink.sparsity.masks import owl_ratios, validate_sparsity
from moeshrink.surgery import apply_model_plan, update_config


@dataclass
class PruneResult:
    """The compressed model in memory, its plan, and what it cost."""

    plan: ModelPlan
    model: nn.Module
    tokenizer: Any
    before: ModelInfo
    after: ModelInfo
    output: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    sparsity: SparsityReport | None = None


def resolve_keep(num_experts: int, keep: int | None, ratio: float | None) -> int:
    """Experts kept per layer from ``keep`` (a count) or ``ratio`` (the fraction removed)."""
    if (keep is None) == (ratio is None):
        raise MoeShrinkError(
            "give exactly one budget: --keep K (experts kept per layer) or --ratio R (fraction removed)"
        )
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MoeShrinkError(
                f"--ratio is the fraction of experts removed and must be in (0, 1), got {ratio}"
            )
        keep = max(1, round(num_experts * (1 - ratio)))
    if keep < 1:
        raise MoeShrinkError(f"--keep must be at least 1, got {keep}")
    return int(keep)


def versions() -> dict[str, str]:
    import transformers

    return {
        "moeshrink": moeshrink.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoeShrinkError(f"--device {device} asked but no CUDA device is available: use --device cpu")
    return device


def prune(
    model: str | Path,
    method: str,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    calib: Sequence[str | Path] | str | Path | None = None,
    output: str | Path | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    top_k: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    error_propagation: bool = True,
    calib_field: str = "text",
    method_options: dict[str, Any] | None = None,
    sparsity: float | None = None,
    sparsity_method: str = "wanda",
    nm: str | None = None,
    sparsity_scope: str | Sequence[str] | None = None,
    total_sparsity: float | None = None,
    global_budget: bool = False,
    stream: bool | None = None,
    offload_hidden: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Prune the experts of the checkpoint at ``model`` with ``method`` and (if ``output``) export it.

    Every input is checked before the weights are loaded: the family, the budget, the method, the
    calibration text and the output directory. ``sparsity`` (a fraction) or ``nm`` ("2:4") also zeroes
    weights inside the surviving experts (``sparsity_method``: wanda by default, owl for per-layer
    ratios, magnitude without data) and, with ``sparsity_scope``, in attention or dense linear layers.
    ``total_sparsity`` instead asks for that fraction of the original in-scope weights to be gone,
    removed experts included (STUN's phase 2 budget): the sparsity inside the survivors follows.
    Method ``none`` keeps every expert (to only sparsify, or only lower ``top_k``). With
    ``global_budget`` the experts kept (``keep`` per layer on average, or ``ratio``) are shared out over
    the layers by usage (:mod:`moeshrink.methods.budget`) and the output has per-layer counts.
    With ``stream`` one decoder layer at a time is read from the shards, pruned and written
    (:mod:`moeshrink.io.streaming`; ``None``: automatic for checkpoints over half the RAM), and the
    returned model is a weightless skeleton; ``offload_hidden`` keeps the cached hidden states in
    that directory instead of in memory.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if output is not None:
        check_output_dir(output, overwrite, source=model)
    path = resolve_checkpoint(model)
    config, adapter = load_config(path)
    num_experts = adapter.num_experts(config)
    expert_method = get_method(method, seed=seed, **(method_options or {}))
    top_k = int(top_k or config.num_experts_per_tok)
    if expert_method.name == "none":
        if keep is not None or ratio is not None:
            raise MoeShrinkError("method 'none' keeps every expert: drop --keep / --ratio")
        keep = num_experts
        adapter.check_top_k(config, top_k, keep)
    else:
        keep = resolve_keep(num_experts, keep, ratio)
        adapter.check_budget(config, keep, top_k)
    if total_sparsity is not None:
        if sparsity is not None or nm:
            raise MoeShrinkError("give either --total-sparsity or --sparsity / --nm, not both")
        validate_sparsity(total_sparsity, "total sparsity")
        sparsify = SparsitySpec(0.0, sparsity_method, scope=parse_scope(sparsity_scope))
    else:
        sparsify = SparsitySpec.parse(sparsity, sparsity_method, nm, sparsity_scope)
    if expert_method.name == "none" and sparsify is None and top_k == int(config.num_experts_per_tok):
        raise MoeShrinkError("method 'none' with no --sparsity, --nm or --top-k change would change nothing")
    device = _device(device)
    if distributed.launched_distributed():
        device = str(distributed.init_distributed(device))

    calibration = None
    tokenizer = load_tokenizer(path)
    if global_budget and expert_method.name == "none":
        raise MoeShrinkError(
            "a global budget shares out the experts kept: it needs a method other than 'none'"
        )
    if total_sparsity is not None:  # fails here, before anything is loaded, if experts alone remove more
        inside_sparsity(
            meta_model(config, adapter),
            adapter,
            sparsify.scope,
            _uniform(config, adapter, keep),
            total_sparsity,
        )
    wants_data = sparsify is not None and sparsify.uses_wanda
    if expert_method.needs or wants_data or global_budget:
        if not calib:
            raise MoeShrinkError(
                f"method '{expert_method.name}'{' with a global budget' if global_budget else ''} needs calibration "
                "text: pass --calib FILE"
            )
        if tokenizer is None:
            raise MoeShrinkError(f"{path} has no tokenizer files; calibration needs the model's tokenizer")
        paths = [calib] if isinstance(calib, (str, Path)) else list(calib)
        calibration = build_calibration(tokenizer, paths, samples, seq_len, seed, calib_field)
    reader = ShardReader(path)  # every shard present and complete, before anything is written
    if output is not None:
        check_free_disk(output, estimate_output_bytes(reader, adapter, config, keep))
    stream = choose_streaming(
        stream,
        reader,
        output,
        {
            "OWL": sparsify is not None and sparsify.method == "owl",
            "torchrun": distributed.world_size() > 1,
        },
    )
    timings["prepare"] = time.perf_counter() - start

    t = time.perf_counter()
    streamer = LayerStreamer(path, dtype, output=output, overwrite=overwrite) if stream else None
    loaded = (
        streamer.as_loaded(tokenizer)
        if streamer
        else load_model(path, dtype, tokenizer=tokenizer, device=device)
    )
    timings["load"] = time.perf_counter() - t
    before = describe_model(loaded.model, adapter)

    t = time.perf_counter()
    groups = GroupedFamilyAdapter.num_groups(config) if isinstance(adapter, GroupedFamilyAdapter) else 1
    input_ids = distributed.shard(calibration.input_ids) if calibration else None
    moe_layers = [layer.index for layer in adapter.moe_layers(loaded.model)]
    per_layer = dict.fromkeys(moe_layers, keep)
    if global_budget:
        usage = collect_layer_stats(
            loaded.model,
            adapter,
            input_ids,
            expert_method.global_needs,
            device=device,
            batch_size=batch_size,
            progress=progress and distributed.rank() == 0,
            layer_hooks=streamer.reading() if streamer else None,
        )
        minimum = max(top_k, 2 * groups if groups > 1 else top_k)
        layers_by_index = {m.index: m for m in adapter.moe_layers(loaded.model)}
        per_layer = expert_method.allocate_global(
            layers_by_index, usage, keep * len(moe_layers), minimum, groups
        )
        if streamer is not None:  # per-layer counts are saved fused, as the in-memory export does
            streamer.keep_fused = len(set(per_layer.values())) > 1
    sparsity_done: dict[int, dict] = {}
    accounting = None
    if sparsify is not None and total_sparsity is not None:
        inside, accounting = inside_sparsity(loaded.model, adapter, sparsify.scope, per_layer, total_sparsity)
        sparsify = sparsify.with_sparsity(inside)
    if streamer is not None and sparsify is not None:
        streamer.count_zeros = True  # each layer's zeros are counted before it is written and freed
    layer_plans = compress_layerwise(
        loaded.model,
        adapter,
        input_ids,
        lambda layer, stats: expert_method.compress(
            layer, stats, LayerBudget(keep=per_layer[layer.index], top_k=top_k, groups=groups)
        ),
        expert_method.needs,
        top_k,
        device=device,
        batch_size=batch_size,
        error_propagation=error_propagation,
        progress=progress and distributed.rank() == 0,
        sparsify=_sparsify_step(sparsify, sparsity_done) if sparsify and sparsify.method != "owl" else None,
        layer_hooks=streamer,
        offload_hidden=offload_hidden,
    )
    if sparsify is not None and sparsify.method == "owl":
        ratios = owl_layer_ratios(loaded.model, adapter, input_ids, sparsify, device, batch_size)
        compress_layerwise(
            loaded.model,
            adapter,
            input_ids,
            None,
            frozenset(),
            top_k,
            device=device,
            batch_size=batch_size,
            error_propagation=error_propagation,
            progress=progress and distributed.rank() == 0,
            sparsify=_sparsify_step(sparsify, sparsity_done, ratios),
        )
    for lp in layer_plans:
        lp.sparsity = sparsity_done.pop(lp.layer, None)
    update_config(loaded.model, adapter, {lp.layer: lp.num_experts_after for lp in layer_plans}, top_k)
    timings["compress"] = time.perf_counter() - t

    plan = ModelPlan(
        method=expert_method.name,
        method_options=expert_method.options,
        budget=({"keep": keep} if ratio is None else {"keep": keep, "ratio": ratio})
        | (
            {"scope": "global", "total": sum(per_layer.values()), "per_layer": per_layer}
            if global_budget
            else {}
        ),
        top_k=top_k,
        source=_source(path, adapter, num_experts, config.num_experts_per_tok),
        calibration=calibration.info
        | {"error_propagation": error_propagation, "processes": distributed.world_size()}
        if calibration
        else None,
        sparsity=_sparsity_summary(sparsify, total_sparsity, accounting, sparsity_done) if sparsify else None,
        versions=versions(),
        layers=layer_plans,
    )
    after = describe_model(loaded.model, adapter)
    result = PruneResult(plan=plan, model=loaded.model, tokenizer=tokenizer, before=before, after=after)
    if sparsify:
        result.sparsity = streamer.sparsity_report() if streamer else count_sparsity(loaded.model)
        if total_sparsity is not None:
            in_scope = scoped_parameter_names(loaded.model, adapter, sparsify.scope)
            remaining = sum(t.total - t.zeros for t in result.sparsity.tensors if t.name in in_scope)
            plan.sparsity["total_sparsity_achieved"] = 1 - remaining / accounting["scope_weights"]
    if output is not None:
        t = time.perf_counter()
        if distributed.rank() == 0:  # every rank holds the same compressed model; one writes it
            result.output = _export(result, adapter, path, output, overwrite, streamer)
        distributed.barrier()
        result.output = Path(output)
        timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    result.seconds = timings
    return result


def _uniform(config, adapter: FamilyAdapter, keep: int) -> dict[int, int]:
    return dict.fromkeys(range(int(config.num_hidden_layers)), keep)


def _sparsify_step(
    spec: SparsitySpec, done: dict[int, dict], ratios: dict[int, float] | None = None
) -> SparsifyStep:
    """The runner step that sparsifies each layer by ``spec`` (at ``ratios[layer]`` when given, OWL)
    and records what it did in ``done``."""

    def apply(index, decoder_layer, moe, stats, linear_norms) -> None:
        layer_spec = spec.with_sparsity(ratios.get(index, spec.sparsity)) if ratios is not None else spec
        done[index] = sparsify_decoder_layer(decoder_layer, moe, stats, linear_norms, layer_spec)

    return SparsifyStep(
        apply=apply,
        needs=spec.needs,
        linears=(lambda layer, moe: scoped_linears(layer, moe, spec.scope) if spec.uses_wanda else {}),
        dense_layers=spec.covers_linears,
    )


def owl_layer_ratios(
    model: nn.Module,
    adapter: FamilyAdapter,
    input_ids: torch.Tensor,
    spec: SparsitySpec,
    device: str,
    batch_size: int,
) -> dict[int, float]:
    """OWL's sparsity per decoder layer from the outlier fraction of each layer's Wanda scores (one
    statistics pass, nothing changed), weighted so the in-scope weights overall reach ``spec.sparsity``."""
    fractions: dict[int, float] = {}
    sizes: dict[int, int] = {}

    def measure(index, decoder_layer, moe, stats, linear_norms) -> None:
        fractions[index] = layer_outlier_fraction(decoder_layer, moe, stats, linear_norms, spec)
        sizes[index] = scoped_weight_count(decoder_layer, moe, spec.scope)

    step = _sparsify_step(spec, {})
    step.apply = measure
    compress_layerwise(
        model,
        adapter,
        input_ids,
        None,
        frozenset(),
        0,
        device=device,
        batch_size=batch_size,
        progress=False,
        sparsify=step,
    )
    layers = sorted(i for i in fractions if sizes[i])
    ratios = owl_ratios([fractions[i] for i in layers], spec.sparsity, spec.owl_lambda)
    weight = torch.tensor([float(sizes[i]) for i in layers], dtype=torch.float64)
    shift = spec.sparsity - float((torch.tensor(ratios, dtype=torch.float64) * weight).sum() / weight.sum())
    return {i: min(max(r + shift, 0.0), 1 - 1e-9) for i, r in zip(layers, ratios, strict=True)}


def _sparsity_summary(
    spec: SparsitySpec, total: float | None, accounting: dict | None, done: dict[int, dict]
) -> dict[str, Any]:
    summary = spec.to_dict()
    if total is not None:
        summary |= accounting
    if done:  # decoder layers without routed experts that were sparsified too
        summary["dense_layers"] = {str(i): d for i, d in sorted(done.items())}
    return summary


def _source(path: Path, adapter: FamilyAdapter, num_experts: int, top_k: int) -> dict[str, Any]:
    return {
        "path": str(path.resolve()),
        "model_type": adapter.model_type,
        "num_experts": num_experts,
        "top_k": int(top_k),
        "fingerprint": checkpoint_fingerprint(path),
    }


def _export(
    result: PruneResult,
    adapter: FamilyAdapter,
    source: Path,
    output: str | Path,
    overwrite: bool,
    streamer: LayerStreamer | None = None,
) -> Path:
    card = model_card(result.plan, result.before, result.after, Path(output).name, result.sparsity)
    if streamer is not None:  # the layers are written already
        return streamer.commit(result.plan, tokenizer=result.tokenizer, model_card=card)
    return export_checkpoint(
        result.model,
        adapter,
        result.plan,
        output,
        source=source,
        tokenizer=result.tokenizer,
        model_card=card,
        overwrite=overwrite,
    )


def apply_plan(
    model: str | Path,
    plan: str | Path | ModelPlan,
    output: str | Path | None = None,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
) -> PruneResult:
    """Re-apply a saved plan to the checkpoint it was made from (no calibration needed)."""
    if output is not None:
        check_output_dir(output, overwrite, source=model)
    path = resolve_checkpoint(model)
    plan = plan if isinstance(plan, ModelPlan) else load_plan(plan)
    if plan.sparsity:
        raise MoeShrinkError(
            "this plan zeroed weights inside experts with masks computed from calibration data, which the plan "
            "does not store: rerun moeshrink prune with the same recipe to reproduce it"
        )
    fingerprint = plan.source.get("fingerprint")
    if fingerprint and fingerprint != checkpoint_fingerprint(path):
        raise MoeShrinkError(
            f"{path} is not the checkpoint this plan was made from ({plan.source.get('path')}): "
            "its config or weight files differ"
        )
    loaded = load_model(path, dtype)
    before = describe_model(loaded.model, loaded.adapter)
    apply_model_plan(loaded.model, loaded.adapter, plan)
    after = describe_model(loaded.model, loaded.adapter)
    result = PruneResult(
        plan=plan, model=loaded.model, tokenizer=loaded.tokenizer, before=before, after=after
    )
    if output is not None:
        result.output = _export(result, loaded.adapter, path, output, overwrite)
    return result
