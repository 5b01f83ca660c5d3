"""A quantized checkpoint (block-FP8 or compressed-tensors) as a layer source, and its pruned output
written bit-exact.

:class:`QuantizedLayers` reads one decoder layer at a time from the shards and dequantizes its
quantized weights into the compute dtype (the model is never dequantized whole): streamed (each layer freed
after use, peak memory one layer) or resident (the dequantized layers kept, e.g. to compare the
output with). Its :meth:`~BlockFP8Layers.commit` writes the output from the *input's* tensors, not
the dequantized ones: every tensor of a kept expert (quantized weight, scale, zero point,
activation scale) and every other tensor is copied byte for byte, experts renumbered; router rows are
the plan's rows of the stored router (an exact copy for pruning; a quantized router is refused); the
quantization config is written back with expert names in its ignore list (and compressed-tensors'
config group targets) renumbered. A plan whose new experts are not plain copies (a merge) is refused.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import (
    LoadedModel,
    check_moe_layers,
    load_config,
    load_tokenizer,
    resize_per_layer,
    resolve_checkpoint,
    resolve_dtype,
)
from moeshrink.io.export import atomic_directory, write_extras
from moeshrink.io.streaming import ShardReader, ShardWriter, StreamedLayers
from moeshrink.methods import ExpertMethod
from moeshrink.methods.merging import MergeMethod
from moeshrink.plan import LayerPlan, ModelPlan, NewExpert
from moeshrink.quant import IGNORE_KEYS, CompressedTensorsScheme, QuantScheme, read_quantization
from moeshrink.quant.ctensors import CompressedTensorsCheckpoint
from moeshrink.quant.fp8 import BlockFP8Checkpoint
from moeshrink.serving import serving_architectures
from moeshrink.surgery import set_top_k
from moeshrink.surgery.apply import TOP_K_PER_LAYER_KEY

QuantizedCheckpoint = BlockFP8Checkpoint | CompressedTensorsCheckpoint

# A routed expert's on-disk tensor: "<block>.experts.<index>.<rest>" (shared experts do not match:
# "shared_experts." has no dot before "experts").
EXPERT_KEY = re.compile(r"^(?P<head>(?:.*\.)?)experts\.(?P<index>\d+)(?P<tail>(?:\..*)?)$")


def copied_source(expert: NewExpert) -> int | None:
    """The one old expert this new expert is a plain copy of (None for a merge or a re-fit): one
    source with weight 1, any others with weight 0, no neuron permutation of that source."""
    live = [(i, s) for i, (s, w) in enumerate(zip(expert.sources, expert.weights, strict=True)) if w != 0]
    if len(live) != 1 or expert.weights[live[0][0]] != 1.0 or expert.refit:
        return None
    perm = (expert.permutations or [None] * len(expert.sources))[live[0][0]]
    if perm is not None and perm != sorted(perm):
        return None
    return live[0][1]


def expert_map(plan: LayerPlan) -> dict[int, list[int]]:
    """Old expert -> the new experts that copy it; a one-line error for a merged expert."""
    out: dict[int, list[int]] = {}
    for new, expert in enumerate(plan.experts):
        old = copied_source(expert)
        if old is None:
            raise MoeShrinkError(
                f"layer {plan.layer}: new expert {new} merges experts {expert.sources}: a quantized checkpoint "
                "is only pruned here (kept experts copied bit-exact); merging is not supported on it"
            )
        out.setdefault(old, []).append(new)
    return out


def renumber_ignored(names: list[str], plans: dict[int, LayerPlan]) -> list[str]:
    """An ignore list (module names) with each routed expert's name renumbered as the plan renumbers
    the expert, and dropped with it; every other name unchanged."""
    out = []
    for name in names:
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        match = EXPERT_KEY.match(name)
        plan = plans.get(int(layer.group(1))) if layer else None
        if match is None or plan is None:
            out.append(name)
            continue
        for new in expert_map(plan).get(int(match["index"]), []):
            out.append(f"{match['head']}experts.{new}{match['tail']}")
    return out


class QuantizedLayers(StreamedLayers):
    """A quantized checkpoint whose decoder layers are read and dequantized one at a time (a
    :class:`~moeshrink.engine.offload.LayerSource`); ``resident`` keeps them once read."""

    def __init__(
        self,
        path: Path,
        config: PretrainedConfig,
        adapter: FamilyAdapter,
        reader: ShardReader,
        fp8: QuantizedCheckpoint,
        dtype: str | torch.dtype = "auto",
        *,
        resident: bool = False,
    ):
        self.fp8 = fp8
        self.storage = resolve_dtype(config, "auto")  # what the unquantized tensors are stored in
        self.resident = resident
        self.keeps_changes = resident
        super().__init__(path, config, adapter, reader, dtype, output=None)
        resize_per_layer(self.model, adapter, config)  # an output with per-layer expert counts
        self._check_layout()

    def _load_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        super()._load_state(self.fp8.dequantize_state(state, self.storage, self.dtype), what)

    def release(self, index: int, *, write: bool) -> None:
        """Streamed: free the layer (the output is written from the input's tensors); resident: keep it."""
        if not self.resident:
            super().release(index, write=False)

    def load_all(self) -> None:
        """Read every decoder layer (resident)."""
        for index in range(len(self.layers)):
            self.load(index)

    def commit(
        self,
        plan: ModelPlan,
        output: str | Path,
        *,
        overwrite: bool = False,
        tokenizer=None,
        model_card: str | None = None,
        before_commit: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the pruned checkpoint to ``output`` atomically, then call ``before_commit`` on it."""
        plans = {lp.layer: lp for lp in plan.layers}
        for lp in plan.layers:
            expert_map(lp)  # refuse a merge before anything is written
        with atomic_directory(output, overwrite, source=self.path) as tmp:
            self._write_tensors(plans, tmp)
            self._write_config(plans, tmp)
            write_extras(
                tmp, self.adapter, plan, source=self.path, tokenizer=tokenizer, model_card=model_card
            )
            if before_commit is not None:
                before_commit(tmp)
        return Path(output)

    def _write_tensors(self, plans: dict[int, LayerPlan], directory: Path) -> None:
        """One shard per decoder layer (read, renumbered, written: one layer's bytes in memory at a
        time), then one for the rest; decoder layers beyond the config (e.g. an MTP layer, which the
        model ignores) are left out, as loading the model leaves them out."""
        writer = ShardWriter(directory, len(self.layers) + 1)
        parameters = 0
        for index in [*range(len(self.layers)), None]:
            state = self.reader.read(self.reader.by_layer.get(index, []))
            if index in plans:
                state = self._prune_layer(index, plans[index], state)
            parameters += self.fp8.parameter_count(state)
            writer.write(state)
        writer.finish(parameters)

    def _layout(self, index: int, shapes: dict[str, list[int]], num_experts: int) -> tuple[dict, list[str]]:
        """Decoder layer ``index``'s on-disk routed-expert tensors (name -> match of :data:`EXPERT_KEY`)
        and router tensors (one row per expert, beside the experts, not a shared expert's), checked:
        every expert has its own tensors and the router has as many tensors as the model's."""
        experts = {name: m for name in shapes if (m := EXPERT_KEY.match(name))}
        found = {int(m["index"]) for m in experts.values()}
        if found != set(range(num_experts)):
            raise MoeShrinkError(
                f"{self.path}: layer {index} does not store one tensor set per expert 0..{num_experts - 1} (found "
                f"{sorted(found)[:4]}{'...' if len(found) > 4 else ''}): fused or missing expert tensors are not "
                f"supported in a {self.fp8.scheme.name} checkpoint"
            )
        heads = {m["head"] for m in experts.values()}
        routers = [
            name
            for name, shape in shapes.items()
            if name not in experts
            and any(name.startswith(h) for h in heads)
            and "shared" not in name
            and len(shape) >= 1
            and shape[0] == num_experts
        ]
        quantized = self.fp8.quantized_modules
        for name in routers:
            if name.rpartition(".")[0] in quantized:
                raise MoeShrinkError(
                    f"{self.path}: layer {index}'s router {name.rpartition('.')[0]} is stored quantized: moeshrink "
                    "slices router rows in the unquantized router only (llm-compressor's MoE recipes leave it out: "
                    "add it to the ignore list when quantizing), or dequantize the checkpoint first"
                )
        moe = self.adapter.moe_layer(self.layers[index], index)
        if moe is None or len(routers) != len(moe.router_tensors()):
            raise MoeShrinkError(
                f"{self.path}: could not find layer {index}'s router on disk (found {routers}): this checkpoint's "
                f"layout is not one moeshrink can prune in {self.fp8.scheme.name}"
            )
        return experts, routers

    def _check_layout(self) -> None:
        """Every MoE layer's experts and router found on disk (headers only), before any work."""
        for moe in self.adapter.moe_layers(self.model):
            keys = self.reader.by_layer.get(moe.index, [])
            self._layout(moe.index, {k: self.fp8.tensors[k][1] for k in keys}, moe.num_experts)

    def _prune_layer(
        self, index: int, plan: LayerPlan, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Layer ``index``'s on-disk tensors as ``plan`` leaves them: kept experts' tensors under their
        new numbers (the same bytes), router rows chosen (or combined) from the stored rows."""
        mapping = expert_map(plan)
        shapes = {name: list(t.shape) for name, t in state.items()}
        experts, routers = self._layout(index, shapes, plan.num_experts_before)
        out = {k: v for k, v in state.items() if k not in routers and k not in experts}
        for name, match in experts.items():
            for new in mapping.get(int(match["index"]), []):
                out[f"{match['head']}experts.{new}{match['tail']}"] = state[name]
        for name in routers:
            out[name] = router_rows(state[name], plan)
        return out

    def describe(self, plan: ModelPlan) -> dict[str, Any]:
        """What the plan records of the quantized input and output: the scheme, and the tensor bytes
        of the input and of the output (kept experts and router rows counted from the headers)."""
        plans = {lp.layer: lp for lp in plan.layers}
        after = 0
        for index, keys in self.reader.by_layer.items():
            if index is not None and index >= len(self.layers):
                continue  # beyond the config (an MTP layer): not written
            if index not in plans:
                after += sum(self.reader.nbytes[k] for k in keys)
                continue
            lp = plans[index]
            experts, routers = self._layout(
                index, {k: self.fp8.tensors[k][1] for k in keys}, lp.num_experts_before
            )
            mapping = expert_map(lp)
            for key in keys:
                if key in experts:
                    after += self.reader.nbytes[key] * len(mapping.get(int(experts[key]["index"]), []))
                elif key in routers:
                    after += self.reader.nbytes[key] * lp.num_experts_after // lp.num_experts_before
                else:
                    after += self.reader.nbytes[key]
        return self.fp8.scheme.describe() | {
            "tensor_bytes_before": self.reader.total_bytes,
            "tensor_bytes_after": after,
        }

    def _write_config(self, plans: dict[int, LayerPlan], directory: Path) -> None:
        """config.json from the model's (updated) config in the source's dtype, the quantization config
        as the source has it with expert names renumbered, generation_config.json as the source's."""
        config = copy.deepcopy(self.model.config)
        source_raw = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        config.architectures = serving_architectures(
            config, config.architectures or [type(self.model).__name__]
        )
        config.save_pretrained(directory)
        written = json.loads((directory / "config.json").read_text())
        stored = source_raw.get("dtype") or source_raw.get("torch_dtype")  # not the compute dtype
        if stored is not None:
            written["dtype"] = stored
            if "torch_dtype" in source_raw:
                written["torch_dtype"] = stored
        scheme: QuantScheme = self.fp8.scheme
        quant = dict(scheme.config)
        for key in IGNORE_KEYS:
            if isinstance(quant.get(key), list):
                quant[key] = renumber_ignored(quant[key], plans)
        if isinstance(scheme, CompressedTensorsScheme):  # per-module targets of each config group too
            quant["config_groups"] = {
                name: dict(group, targets=renumber_ignored(group["targets"], plans))
                for name, group in quant["config_groups"].items()
            }
        if scheme.origin == "config.json":
            written.pop("compression_config", None)
            key = "quantization_config" if "quantization_config" in source_raw else "compression_config"
            written[key] = quant
        else:
            written.pop("quantization_config", None)
            (directory / scheme.origin).write_text(json.dumps(quant, indent=2) + "\n")
        (directory / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        if (self.path / "generation_config.json").is_file():
            shutil.copy2(self.path / "generation_config.json", directory / "generation_config.json")


def router_rows(tensor: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """The router tensor's rows for the plan's new experts: an exact copy when each new expert keeps one
    old expert's row, else the plan's combination of rows computed in float32 (as the surgery does)."""
    if all(e.is_plain_copy for e in plan.experts):
        return tensor.index_select(0, torch.tensor([e.sources[0] for e in plan.experts])).contiguous()
    mix = torch.zeros(len(plan.experts), tensor.shape[0], dtype=torch.float32)
    for i, e in enumerate(plan.experts):
        for source, w in zip(e.sources, e.router_weights, strict=True):
            mix[i, source] += w
    flat = tensor.float().reshape(tensor.shape[0], -1)
    return (mix @ flat).reshape(len(plan.experts), *tensor.shape[1:]).to(tensor.dtype).contiguous()


def open_quantized(path: Path, scheme: QuantScheme, reader: ShardReader) -> QuantizedCheckpoint:
    """The checkpoint's quantized tensors, checked against its scheme (headers only)."""
    if isinstance(scheme, CompressedTensorsScheme):
        return CompressedTensorsCheckpoint.scan(path, reader.files, scheme)
    return BlockFP8Checkpoint.scan(path, reader.files, scheme)


def load_quantized_model(
    path: str | Path, dtype: str = "auto", tokenizer: object | None = None
) -> LoadedModel:
    """Load a quantized checkpoint dequantized into ``dtype`` (one layer dequantized at a time, all
    kept), as :func:`moeshrink.io.checkpoint.load_model` does for unquantized ones."""
    path = resolve_checkpoint(path)
    scheme = read_quantization(path)
    if scheme is None:
        raise MoeShrinkError(f"{path} is not a quantized checkpoint")
    config, adapter = load_config(path)
    reader = ShardReader(path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    source = QuantizedLayers(
        path, config, adapter, reader, open_quantized(path, scheme, reader), torch_dtype, resident=True
    )
    source.load_all()
    model = source.model
    model.eval()
    check_moe_layers(model, adapter, path)
    per_layer_top_k = getattr(config, TOP_K_PER_LAYER_KEY, None)
    if per_layer_top_k:
        for layer in adapter.moe_layers(model):
            set_top_k(layer, int(per_layer_top_k[layer.index]))
    return LoadedModel(model=model, adapter=adapter, path=path, tokenizer=tokenizer or load_tokenizer(path))


def check_quantized_job(
    path: Path,
    scheme: QuantScheme,
    reader: ShardReader,
    *,
    method: ExpertMethod,
    sparsifies: bool,
    stream: bool | None,
    output: str | Path | None,
    world_size: int = 1,
) -> tuple[QuantizedCheckpoint, bool]:
    """The job's checks for a quantized input (scales against weights, headers only) and whether it is
    streamed: by default whenever an output is written (one dequantized layer in memory), resident
    with ``--no-stream`` or without an output (the whole model dequantized, e.g. for the Python API)."""
    if sparsifies:
        raise MoeShrinkError(
            f"{path} is {scheme.name}: sparsity inside its experts would change quantized weights, which moeshrink "
            "does not re-quantize yet; prune experts only (kept experts are copied bit-exact), or dequantize "
            "the checkpoint first"
        )
    settings = getattr(method, "settings", None)
    representative = getattr(settings, "mode", None) == "representative"
    if isinstance(method, MergeMethod) and (not representative or getattr(settings, "reconstruct", False)):
        raise MoeShrinkError(
            f"{path} is {scheme.name}: method '{method.name}' merges experts (or re-fits them), which would need "
            "dequantize -> merge -> re-quantize, not supported yet; use a pruning method (frequency, reap, ean, "
            "soft_activation, naee, random, or stun with --option mode=representative), or dequantize the "
            "checkpoint first"
        )
    fp8 = open_quantized(path, scheme, reader)
    if stream is None:
        stream = output is not None and world_size == 1
    return fp8, bool(stream)


# The block-FP8 names this module had first.
BlockFP8Layers = QuantizedLayers
open_block_fp8 = open_quantized

__all__ = [
    "BlockFP8Layers",
    "QuantizedLayers",
    "check_quantized_job",
    "copied_source",
    "load_quantized_model",
    "open_block_fp8",
    "open_quantized",
    "renumber_ignored",
]
