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
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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
from moeshrink.quant import (
    IGNORE_KEYS,
    BlockFP8Scheme,
    CompressedTensorsScheme,
    QuantScheme,
    read_quantization,
)
from moeshrink.quant.ctensors import AUXILIARY, CompressedTensorsCheckpoint
from moeshrink.quant.fp8 import SCALE_SUFFIX, BlockFP8Checkpoint
from moeshrink.quant.requant import digest, requantize, summarize
from moeshrink.serving import serving_architectures
from moeshrink.sparsity.accounting import layer_of, tensor_sparsity
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


def layout_map(plan: LayerPlan) -> dict[int, list[int]]:
    """Old expert -> the new experts laid out as it (a copy of it, or a merge whose first live source it
    is): what their tensors' bytes are counted as before they are written."""
    out: dict[int, list[int]] = {}
    for new, expert in enumerate(plan.experts):
        live = [s for s, w in zip(expert.sources, expert.weights, strict=True) if w != 0] or expert.sources
        out.setdefault(live[0], []).append(new)
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


@dataclass
class _Record:
    """What the job left in one decoder layer, taken before the layer is freed: the digest of every
    tensor as ``save_pretrained`` names it (dense, new numbering), and the tensors that differ from
    every input tensor of their kind (kept here, or spilled to ``file`` when streamed)."""

    digests: dict[str, bytes]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    file: Path | None = None

    def computed(self, name: str) -> torch.Tensor:
        """The job's value of tensor ``name``."""
        if self.file is not None and not self.tensors:
            self.tensors = load_file(self.file)
        if name not in self.tensors:
            raise RuntimeError(f"no computed value of {name} was kept")
        return self.tensors[name]


def _family(name: str) -> str:
    """A tensor's kind: the name with a routed expert's number left out (``experts.*``)."""
    match = EXPERT_KEY.match(name)
    return name if match is None else f"{match['head']}experts.*{match['tail']}"


class QuantizedLayers(StreamedLayers):
    """A quantized checkpoint whose decoder layers are read and dequantized one at a time (a
    :class:`~moeshrink.engine.offload.LayerSource`); ``resident`` keeps them once read.

    With ``requantize`` (a job that changes weights: merging, reconstruction, sparsity, recovery) each
    layer is fingerprinted as it is read and again when the job is done with it; the tensors that then
    match no input tensor of their kind are kept (spilled to a temporary file under ``spill`` when
    streamed), and :meth:`commit` re-quantizes exactly those in the input's scheme
    (:mod:`moeshrink.quant.requant`), copying every other tensor's bytes."""

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
        requantize: bool = False,
        count_zeros: bool = False,
        spill: Path | None = None,
    ):
        self.fp8 = fp8
        self.storage = resolve_dtype(config, "auto")  # what the unquantized tensors are stored in
        self.resident = resident
        self.keeps_changes = resident
        self.requantize = requantize
        self._inputs: dict[int, dict[str, bytes]] = {}  # layer -> dense on-disk name -> the input's digest
        self._records: dict[int, _Record] = {}
        self._written: dict[int, list[tuple[str, str, int, bool, list[int]]]] = {}
        self._errors: dict[int | None, list[tuple[str, float, bool]]] = {}
        self._spill_root, self._spill = spill, None
        super().__init__(path, config, adapter, reader, dtype, output=None, count_zeros=count_zeros)
        resize_per_layer(self.model, adapter, config)  # an output with per-layer expert counts
        self._check_layout()

    def _load_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        dense = self.fp8.dequantize_state(state, self.storage, self.dtype)
        if self.requantize:
            layers = {layer_of(k) for k in dense}
            index = layers.pop() if len(layers) == 1 else None
            if index is not None:
                self._inputs[index] = {
                    k: digest(v.to(self.dtype) if v.is_floating_point() else v) for k, v in dense.items()
                }
        super()._load_state(dense, what)

    def release(self, index: int, *, write: bool) -> None:
        """Streamed: free the layer (the output is written from the input's tensors, and with
        ``requantize`` from what the job changed, kept now); resident: keep it."""
        if self.resident:
            return
        if write and index in self.loaded:
            if self.requantize:
                self._records[index] = self._record(index, spill=True)
            if self.zero_counts is not None:
                self.zero_counts += [
                    tensor_sparsity(self.prefixes[index] + n, p)
                    for n, p in self.layers[index].named_parameters()
                ]
            self.released.add(index)
        super().release(index, write=False)

    def open_output(self, fused_experts: bool) -> None:
        """The output keeps the input's per-expert tensors whatever the per-layer expert counts (its
        config records them): the job's view of each layer stays per expert too."""

    def _record(self, index: int, *, spill: bool) -> _Record:
        """Layer ``index`` as the job left it: every tensor's digest, and those that match no input
        tensor of their kind (spilled to a file when ``spill``)."""
        layer = self.layers[index]
        disk = self._on_disk({self.prefixes[index] + k: v for k, v in layer.state_dict().items()})
        known: dict[str, set[bytes]] = defaultdict(set)
        for name, d in self._inputs.get(index, {}).items():
            known[_family(name)].add(d)
        record = _Record(digests={})
        for name, tensor in disk.items():
            record.digests[name] = d = digest(tensor)
            if d not in known[_family(name)]:
                record.tensors[name] = tensor.detach().clone()
        if spill and record.tensors:
            record.file = self._spill_dir() / f"layer-{index:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in record.tensors.items()}, record.file)
            record.tensors = {}
        return record

    def _spill_dir(self) -> Path:
        """A temporary directory for the changed tensors of streamed layers (removed at commit, or when
        the source is dropped)."""
        if self._spill is None:
            root = Path(self._spill_root or tempfile.gettempdir()).absolute()
            while not root.exists():
                root = root.parent
            self._spill = Path(tempfile.mkdtemp(prefix=".moeshrink-requant-", dir=root))
            weakref.finalize(self, shutil.rmtree, self._spill, True)
        return self._spill

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
        model_card: str | Callable[[ModelPlan], str] | None = None,
        before_commit: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the compressed checkpoint to ``output`` atomically, then call ``before_commit`` on it.
        ``model_card``: the card, or a function of the plan that makes it once the re-quantization
        errors are in the plan."""
        plans = {lp.layer: lp for lp in plan.layers}
        if not self.requantize:
            for lp in plan.layers:
                expert_map(lp)  # refuse a merge before anything is written
        elif self.resident:
            self._records = {i: self._record(i, spill=False) for i in range(len(self.layers))}
        try:
            with atomic_directory(output, overwrite, source=self.path) as tmp:
                written = self._write_tensors(plans, tmp)
                self._write_config(plans, tmp)
                if self.requantize:
                    self._note_requantization(plan, written)
                card = model_card(plan) if callable(model_card) else model_card
                write_extras(tmp, self.adapter, plan, source=self.path, tokenizer=tokenizer, model_card=card)
                if before_commit is not None:
                    before_commit(tmp)
        finally:
            if self._spill is not None:
                shutil.rmtree(self._spill, ignore_errors=True)
        return Path(output)

    def _write_tensors(self, plans: dict[int, LayerPlan], directory: Path) -> int:
        """One shard per decoder layer (read, renumbered, written: one layer's bytes in memory at a
        time), then one for the rest; decoder layers beyond the config (e.g. an MTP layer, which the
        model ignores) are left out, as loading the model leaves them out. Returns the tensor bytes."""
        writer = ShardWriter(directory, len(self.layers) + 1)
        parameters = 0
        for index in [*range(len(self.layers)), None]:
            state = self.reader.read(self.reader.by_layer.get(index, []))
            if self.requantize and index is not None:
                state = self._rewrite_layer(index, plans.get(index), state)
            elif index in plans:
                state = self._prune_layer(index, plans[index], state)
            parameters += self.fp8.parameter_count(state)
            writer.write(state)
        writer.finish(parameters)
        return writer.total_size

    def _unit(self, name: str) -> tuple[str, str]:
        """The unit a stored tensor belongs to: a quantized module (``q``: its weight, scales, zero
        points ...), an unquantized module's weight (``p``), or any other tensor (``t``), by name."""
        module, _, suffix = name.rpartition(".")
        if module in self.fp8.quantized_modules:
            fp8_params = ("weight", "weight" + SCALE_SUFFIX)
            if suffix in (
                fp8_params if isinstance(self.fp8.scheme, BlockFP8Scheme) else ("weight", *AUXILIARY)
            ):
                return module, "q"
        if suffix == "weight":
            return module, "p"
        return name, "t"

    @staticmethod
    def _dense(key: str, kind: str) -> str:
        """The dense tensor a unit stands for (what the model and the digests name)."""
        return f"{key}.weight" if kind != "t" else key

    def _changed(
        self,
        index: int,
        out: dict[str, torch.Tensor],
        key: str,
        computed: torch.Tensor,
        layout: tuple[str, str, list[str]],
        state: dict[str, torch.Tensor],
    ) -> None:
        """Write unit ``key`` from the job's ``computed`` weight, in the layout of input unit
        ``layout`` (its key, kind and tensor names): re-quantized for a quantized one, else in the
        stored dtype."""
        source, kind, names = layout
        if kind == "q":
            stored = {n[len(source) + 1 :]: state[n] for n in names}
            done = requantize(self.fp8, source, stored, computed, self.storage)
            for local, tensor in done.tensors.items():
                out[f"{key}.{local}"] = tensor
            self._errors.setdefault(index, []).append((key, done.error, done.kept_scales))
        else:
            out[self._dense(key, kind)] = computed.to(state[names[0]].dtype).contiguous()

    def _rewrite_layer(
        self, index: int, plan: LayerPlan | None, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Layer ``index``'s output tensors: every unit the job left as the input had it is the input's
        bytes (a kept expert under its new number); every changed unit is written from the job's value,
        re-quantized in its source's scheme; router rows as :func:`router_rows` makes them (the job's
        rows where recovery re-fitted them)."""
        record = self._records.get(index)
        if record is None and plan is None:
            return state
        inputs = self._inputs.get(index, {})
        shapes = {name: list(t.shape) for name, t in state.items()}
        experts, routers = self._layout(index, shapes, plan.num_experts_before) if plan else ({}, [])
        units: dict[tuple[str, str], list[str]] = defaultdict(list)
        by_old: dict[int, dict[tuple[str, str], tuple[str, str, list[str]]]] = defaultdict(dict)
        for name in state:
            if name in routers:
                continue
            key, kind = self._unit(name)
            units[(key, kind)].append(name)
        out: dict[str, torch.Tensor] = {}
        for (key, kind), names in units.items():
            match = EXPERT_KEY.match(names[0]) if names[0] in experts else None
            if match is not None:
                prefix = f"{match['head']}experts.{match['index']}"
                by_old[int(match["index"])][(match["head"], key[len(prefix) :])] = (key, kind, names)
                continue
            dense = self._dense(key, kind)
            if record is None or record.digests.get(dense) == inputs.get(dense):
                out.update({n: state[n] for n in names})
            else:
                self._changed(index, out, key, record.computed(dense), (key, kind, names), state)
        if plan is None:
            return out
        refit_router = any(n.startswith("router") for e in plan.experts for n in e.refit)
        for name in routers:
            out[name] = (
                record.computed(name).to(state[name].dtype).contiguous()
                if refit_router and record is not None
                else router_rows(state[name], plan)
            )
        written = self._written.setdefault(index, [])
        for new, expert in enumerate(plan.experts):
            live = [
                s for s, w in zip(expert.sources, expert.weights, strict=True) if w != 0
            ] or expert.sources[:1]
            copy = copied_source(expert)
            tails = list(dict.fromkeys(t for s in live for t in by_old[s]))
            for head, tail in tails:
                new_key = f"{head}experts.{new}{tail}"
                kind = next(by_old[s][(head, tail)][1] for s in live if (head, tail) in by_old[s])
                dense = self._dense(new_key, kind)
                got = record.digests.get(dense) if record is not None else None
                order = ([copy] if copy is not None else []) + sorted(by_old)

                def matches(
                    old: int,
                    head: str = head,
                    tail: str = tail,
                    got: bytes | None = got,
                    copy: int | None = copy,
                ) -> bool:
                    if (head, tail) not in by_old[old]:
                        return False
                    if record is None:  # a layer the job did not visit: kept experts only
                        return old == copy
                    key, kind, _ = by_old[old][(head, tail)]
                    return got is not None and got == inputs.get(self._dense(key, kind))

                same = next((old for old in order if matches(old)), None)
                if same is not None:
                    key, kind, names = by_old[same][(head, tail)]
                    for n in names:
                        out[new_key + n[len(key) :]] = state[n]
                    written.append((head, tail, new, kind == "q", [same]))
                    continue
                layout = next(
                    (
                        by_old[s][(head, tail)]
                        for s in live
                        if by_old[s].get((head, tail), ("", ""))[1] == "q"
                    ),
                    next(by_old[s][(head, tail)] for s in live if (head, tail) in by_old[s]),
                )
                assert record is not None
                self._changed(index, out, new_key, record.computed(dense), layout, state)
                written.append((head, tail, new, layout[1] == "q", live))
        return out

    def _note_requantization(self, plan: ModelPlan, tensor_bytes: int) -> None:
        """Record the re-quantization errors in the plan: per MoE layer and over the model."""
        everything = [e for errors in self._errors.values() for e in errors]
        quantization = plan.source.setdefault("quantization", self.fp8.scheme.describe())
        quantization["tensor_bytes_after"] = tensor_bytes
        quantization["requantization"] = summarize(everything) | {
            "method": "round-to-nearest min-max in the input's scheme; zeros only: the input's scales kept",
            "layers": {
                str(i): summarize(self._errors[i]) for i in sorted(k for k in self._errors if k is not None)
            },
        }

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
            mapping = expert_map(lp) if not self.requantize else layout_map(lp)
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

    def _renumber(self, names: list[str]) -> list[str]:
        """An ignore list with each routed expert module that was read unquantized replaced by the new
        experts written unquantized from it (a copy of it, or a merge of unquantized modules only)."""
        out: list[str] = []
        for name in names:
            layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            match = EXPERT_KEY.match(name)
            written = self._written.get(int(layer.group(1))) if layer else None
            if match is None or written is None:
                out.append(name)
                continue
            old = int(match["index"])
            for head, tail, new, quantized, origins in written:
                if head == match["head"] and tail == match["tail"] and not quantized and old in origins:
                    out.append(f"{head}experts.{new}{tail}")
        return list(dict.fromkeys(out))

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
                quant[key] = (
                    self._renumber(quant[key]) if self.requantize else renumber_ignored(quant[key], plans)
                )
        if isinstance(scheme, CompressedTensorsScheme) and not self.requantize:  # per-module targets too
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


def changing_operation(method: ExpertMethod, *, sparsifies: bool, recovers: bool) -> str | None:
    """What in a job changes expert weights (and so re-quantizes them on a quantized input), in words;
    None for a job that only prunes experts (their tensors copied bit-exact)."""
    settings = getattr(method, "settings", None)
    representative = getattr(settings, "mode", None) == "representative"
    if isinstance(method, MergeMethod) and not representative:
        return f"merging (method '{method.name}')"
    if getattr(settings, "reconstruct", False):
        return f"reconstruction (method '{method.name}', reconstruct=true)"
    if sparsifies:
        return "sparsity inside the experts"
    if recovers:
        return "recovery (--recover)"
    return None


def check_requantizable(path: Path, checkpoint: QuantizedCheckpoint, operation: str) -> None:
    """Refuse, in one line before any work, a quantized input whose changed weights moeshrink cannot
    re-quantize exactly as the input's tool would: static activation scales (measured on the unchanged
    experts), GPTQ activation ordering (``weight_g_idx``), config groups that name routed experts."""
    scheme = checkpoint.scheme
    if isinstance(scheme, CompressedTensorsScheme):
        static = sorted(
            name
            for name in checkpoint.tensors
            if name.rpartition(".")[2]
            in ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
        )
        groups = [
            g
            for g in scheme.config.get("config_groups", {}).values()
            if isinstance(g.get("input_activations"), dict) and g["input_activations"].get("dynamic") is False
        ]
        if static or groups:
            raise MoeShrinkError(
                f"{path} is compressed-tensors with static activation scales ({static[0] if static else 'input_activations'}"
                f" dynamic=false): {operation} changes expert weights, and with them the activations those scales were "
                "measured on; moeshrink does not re-calibrate activation scales: prune experts only (kept experts are "
                "copied bit-exact), or quantize with a dynamic-activation scheme (FP8_DYNAMIC, W8A8, W4A16)"
            )
        g_idx = next((n for n in checkpoint.tensors if n.endswith(".weight_g_idx")), None)
        if g_idx is not None:
            raise MoeShrinkError(
                f"{path} is compressed-tensors with activation ordering ({g_idx}, GPTQ actorder=group): {operation} "
                "would re-quantize experts whose groups follow GPTQ's column order, which moeshrink does not reproduce; "
                "prune experts only, or quantize without actorder (or actorder=weight)"
            )
        named = [
            t
            for g in scheme.config.get("config_groups", {}).values()
            for t in g.get("targets", [])
            if EXPERT_KEY.match(t.removeprefix("re:")) or _EXPERT_TARGET.search(t)
        ]
        if named:
            raise MoeShrinkError(
                f"{path}: a compressed-tensors config group targets routed experts by name ({named[0]!r}): {operation} "
                "can make an expert from experts of different groups; prune experts only, or target modules by class "
                "(Linear) and list exceptions in ignore"
            )


_EXPERT_TARGET = re.compile(r"experts\\?\.(\d|\\d|\[)")


def spill_bytes(
    skeleton: torch.nn.Module, adapter: FamilyAdapter, config: PretrainedConfig, keep: int
) -> int:
    """At most how many bytes a streamed re-quantizing job spills: the kept routed experts' weights in
    the checkpoint's storage dtype (``skeleton``: the weightless model)."""
    experts = sum(
        p.numel()
        for layer in adapter.moe_layers(skeleton)
        for n, p in layer.block.named_parameters()
        if n.startswith("experts.")
    )
    itemsize = torch.empty((), dtype=resolve_dtype(config, "auto")).element_size()
    return experts * keep // max(adapter.num_experts(config), 1) * itemsize


def check_quantized_job(
    path: Path,
    scheme: QuantScheme,
    reader: ShardReader,
    *,
    method: ExpertMethod,
    sparsifies: bool,
    recovers: bool = False,
    stream: bool | None,
    output: str | Path | None,
    world_size: int = 1,
) -> tuple[QuantizedCheckpoint, bool, bool]:
    """The job's checks for a quantized input (scales against weights, headers only), whether it is
    streamed (by default whenever an output is written: one dequantized layer in memory; resident with
    ``--no-stream`` or without an output, the whole model dequantized, e.g. for the Python API), and
    whether it re-quantizes (a job that changes expert weights; refused where that cannot be done)."""
    fp8 = open_quantized(path, scheme, reader)
    operation = changing_operation(method, sparsifies=sparsifies, recovers=recovers)
    if operation is not None:
        check_requantizable(path, fp8, operation)
    if stream is None:
        stream = output is not None and world_size == 1
    return fp8, bool(stream), operation is not None


# The block-FP8 names this module had first.
BlockFP8Layers = QuantizedLayers
open_block_fp8 = open_quantized

__all__ = [
    "BlockFP8Layers",
    "QuantizedLayers",
    "changing_operation",
    "check_quantized_job",
    "spill_bytes",
    "check_requantizable",
    "copied_source",
    "load_quantized_model",
    "open_block_fp8",
    "open_quantized",
    "renumber_ignored",
]
