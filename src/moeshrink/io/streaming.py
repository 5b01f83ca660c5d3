"""Stream a checkpoint one decoder layer at a time: prune models larger than memory.

The model is built without weights (parameters on the meta device, buffers such as rotary tables
real). The tensors outside the decoder layers (embeddings, final norm, LM head) are loaded up front;
each decoder layer's tensors are read from the safetensors shards only when the layer-wise runner
reaches it (:meth:`StreamedLayers.load`), and after the runner is done with the layer its tensors
are written to an output shard and the layer goes back to the meta device
(:meth:`StreamedLayers.release`). Peak memory is then one layer plus the cached hidden states.

On-disk key layouts are translated with transformers' own conversion machinery, applied to one
layer's tensors at a time: per-expert keys (``experts.0.w1.weight``) are fused on load exactly as
``from_pretrained`` fuses them, and the output is written in the layout ``save_pretrained`` would
write, so a streamed checkpoint is tensor-for-tensor the one the in-memory path exports.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model, revert_weight_conversion
from transformers.modeling_utils import LoadStateDictConfig, remove_tied_weights_from_state_dict
from transformers.utils import logging as hf_logging

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import (
    TOKENIZER_FILES,
    check_moe_layers,
    check_safetensors_file,
    load_config,
    read_weight_map,
    resolve_checkpoint,
    resolve_dtype,
    weight_files,
)
from moeshrink.io.export import PendingOutput, check_output_dir, out_of_space_is_an_error, write_extras
from moeshrink.plan import ModelPlan
from moeshrink.serving import serving_architectures
from moeshrink.sparsity.accounting import SparsityReport, TensorSparsity, layer_of, tensor_sparsity

SAFETENSORS_METADATA = {"format": "pt"}


class ShardReader:
    """Which shard holds each tensor of a checkpoint, and reading a chosen few of them.

    Every shard is checked (complete header, not truncated) and every tensor the index lists is
    checked to be in its shard before anything is loaded."""

    def __init__(self, path: Path):
        self.path = path
        self.files = weight_files(path)
        for file in self.files:
            check_safetensors_file(file)
        self.location: dict[str, Path] = {}
        self.nbytes: dict[str, int] = {}
        self.itemsize: dict[str, int] = {}
        self.floating: dict[str, bool] = {}
        for file in self.files:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    self.location[key] = file
                    tensor_slice = f.get_slice(key)
                    numel = 1
                    for dim in tensor_slice.get_shape():
                        numel *= dim
                    dtype = tensor_slice.get_dtype()
                    self.itemsize[key] = _itemsize(dtype)
                    self.floating[key] = dtype.upper() in _FLOATING
                    self.nbytes[key] = numel * self.itemsize[key]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_weight_map(index)
            for key, name in weight_map.items():
                if self.location.get(key) != path / name:
                    raise MoeShrinkError(
                        f"{path}: model.safetensors.index.json puts {key} in {name} but that shard does not "
                        "hold it: re-download the checkpoint"
                    )
        self.by_layer: dict[int | None, list[str]] = defaultdict(list)
        for key in self.location:
            self.by_layer[layer_of(key)].append(key)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.location[key]].append(key)
        out = {}
        for file, names in by_file.items():
            with safe_open(file, "pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        return out


_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


_FLOATING = {"F64", "F32", "F16", "BF16"}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype.upper(), 1)


class ShardWriter:
    """Writes an output checkpoint one group of tensors (one decoder layer) per shard, and the index
    at the end."""

    def __init__(self, directory: Path, num_shards: int):
        self.directory = directory
        self.num_shards = num_shards
        self.written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, state: dict[str, torch.Tensor]) -> None:
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.num_shards:05d}.safetensors"
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, self.directory / name, metadata=SAFETENSORS_METADATA)
        for key, tensor in state.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()

    def finish(self, total_parameters: int) -> None:
        if self.written != self.num_shards:
            raise RuntimeError(f"wrote {self.written} shards, expected {self.num_shards}")
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class StreamedLayers:
    """A model skeleton whose decoder layers are read from the shards and written out one at a time
    (a :class:`~moeshrink.engine.offload.LayerSource`).

    The layer loop calls :meth:`load` before it touches a decoder layer and :meth:`release` when it
    is done with it. With ``output`` each layer released for the last time is written to a hidden
    temporary directory beside it; :meth:`commit` writes the rest and renames it into place. A source
    dropped before it commits (an error on the way) removes its temporary directory, so no
    half-written output remains. With ``count_zeros`` each written layer's exact zeros are counted
    (:meth:`sparsity_report`). The checks on the output, the config and the shards are the job's
    (:meth:`open` makes them for a caller without a job)."""

    keeps_changes = False  # a layer freed between passes is read again from the shards, unchanged

    def __init__(
        self,
        path: Path,
        config: PretrainedConfig,
        adapter: FamilyAdapter,
        reader: ShardReader,
        dtype: str | torch.dtype = "auto",
        *,
        output: str | Path | None = None,
        count_zeros: bool = False,
        experts_implementation: str | None = "eager",
    ):
        self.path, self.adapter, self.reader = path, adapter, reader
        self.output = None if output is None else Path(output)
        self.dtype = resolve_dtype(config, dtype)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, experts_implementation=experts_implementation
            )
        self.model.eval()
        self.layers: list[nn.Module] = list(self.adapter.decoder_layers(self.model))
        names = {id(m): n for n, m in self.model.named_modules()}
        self.prefixes = [names[id(layer)] + "." for layer in self.layers]
        self.mapping = get_model_conversion_mapping(self.model)
        self._check_no_extra_layers()
        self.writer = None
        if self.output is not None:
            self.pending = PendingOutput(self.output)
            self.directory = self.pending.directory
            self.writer = ShardWriter(self.directory, len(self.layers) + 1)
        self.loaded: set[int] = set()
        self.released: set[int] = set()
        self.fused_experts = False  # per-layer expert counts are written fused (open_output)
        self.zero_counts: list[TensorSparsity] | None = [] if count_zeros else None
        self.max_loaded = 0  # most decoder layers materialised at once (at most 1 by design)
        self._load_state(self.reader.read(self.reader.by_layer[None]), "the embeddings and head")
        self.model.tie_weights()
        check_moe_layers(self.model, self.adapter, self.path)
        for name, param in self.model.named_parameters():
            if layer_of(name) is None and param.is_meta:
                raise MoeShrinkError(f"{self.path}: the checkpoint has no tensor for {name}: re-download it")

    def _check_no_extra_layers(self) -> None:
        """Refuse decoder layers in the files beyond those the config describes (they would never be
        read: the output would silently lack them), except those the model class ignores (e.g. an MTP
        layer), as loading the whole model does."""
        ignore = [
            re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ()
        ]
        extra = sorted(
            key
            for index, keys in self.reader.by_layer.items()
            if index is not None and index >= len(self.layers)
            for key in keys
            if not any(p.search(key) for p in ignore)
        )
        if extra:
            raise MoeShrinkError(
                f"{self.path}: the checkpoint has a tensor its config.json has no place for, {extra[0]}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + ": it would be dropped silently; the config and weights disagree (e.g. the layer count): "
                "fix config.json or re-download the checkpoint"
            )

    @classmethod
    def open(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "auto",
        *,
        output: str | Path | None = None,
        overwrite: bool = False,
        count_zeros: bool = False,
    ) -> StreamedLayers:
        """Check the checkpoint (and output) and open it for streaming."""
        path = resolve_checkpoint(path)
        if output is not None:
            check_output_dir(output, overwrite, source=path)
        config, adapter = load_config(path)
        return cls(path, config, adapter, ShardReader(path), dtype, output=output, count_zeros=count_zeros)

    def _load_state(self, state: dict[str, torch.Tensor], what: str) -> None:
        """Load ``state`` (on-disk keys) into the skeleton through transformers' conversions."""
        progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(
                self.model, state, LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.mapping)
            )
        finally:
            if progress:
                hf_logging.enable_progress_bar()
        if info.mismatched_keys or info.unexpected_keys:
            bad = sorted(info.unexpected_keys) + [k for k, *_ in info.mismatched_keys]
            raise MoeShrinkError(
                f"{self.path}: tensors of {what} do not fit the model its config.json describes "
                f"(e.g. {bad[0]}): the config and weights disagree; re-download the checkpoint"
            )

    def load(self, index: int) -> None:
        """Read decoder layer ``index``'s tensors from the shards into the model."""
        layer = self.layers[index]
        if index in self.loaded:
            return
        if index in self.released:
            raise RuntimeError(f"decoder layer {index} was already written and released")
        self._load_state(self.reader.read(self.reader.by_layer.get(index, [])), f"decoder layer {index}")
        for name, tensor in layer.named_parameters():
            if tensor.is_meta:
                raise MoeShrinkError(
                    f"{self.path}: the checkpoint has no tensor for {self.prefixes[index]}{name}: re-download it"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MoeShrinkError(
                    f"weight {self.prefixes[index]}{name} contains NaN or inf: the checkpoint is corrupt; "
                    "re-download it"
                )
        self.loaded.add(index)
        self.max_loaded = max(self.max_loaded, len(self.loaded))

    def release(self, index: int, *, write: bool) -> None:
        """Done with decoder layer ``index``: with ``write`` it is final, so it is written to the output
        (when there is one) and its zeros counted; either way its tensors are freed."""
        if index not in self.loaded:
            return
        layer = self.layers[index]
        if write:
            if self.zero_counts is not None:
                self.zero_counts += [
                    tensor_sparsity(self.prefixes[index] + n, p) for n, p in layer.named_parameters()
                ]
            if self.writer is not None:
                state = {self.prefixes[index] + k: v for k, v in layer.state_dict().items()}
                try:
                    with out_of_space_is_an_error(self.output):
                        self.writer.write(self._on_disk(state))
                except BaseException:  # the output cannot be completed: nothing half-written stays
                    self.pending.discard()
                    raise
            self.released.add(index)
        _to_meta(layer)
        self.loaded.discard(index)
        release_freed_memory()

    def open_output(self, fused_experts: bool) -> None:
        """Before the final pass: write the experts fused (per-layer counts, as export_checkpoint does)."""
        if self.released:
            raise RuntimeError("open_output() after layers were written")
        self.fused_experts = fused_experts

    def _on_disk(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes for these tensors: tied copies dropped, conversions reverted
        (kept fused with per-layer expert counts, like ``save_original_format=False``)."""
        ignore = getattr(self.model, "_keys_to_ignore_on_save", None) or []
        state = {k: v for k, v in state.items() if k not in ignore}
        state = remove_tied_weights_from_state_dict(state, self.model)
        return state if self.fused_experts else revert_weight_conversion(self.model, state)

    def sparsity_report(self) -> SparsityReport:
        """Zeros of every parameter, as :func:`~moeshrink.sparsity.accounting.count_sparsity` counts them
        on a whole model: the decoder layers' counted as each was written, the rest now."""
        if self.zero_counts is None:
            raise RuntimeError("open the source with count_zeros=True to count zeros")
        self.release_all()
        rest = [tensor_sparsity(n, p) for n, p in self.model.named_parameters() if layer_of(n) is None]
        return SparsityReport(tuple(self.zero_counts + rest))

    def release_all(self) -> None:
        """Read, write and free every decoder layer the loop did not visit (e.g. after the last MoE layer)."""
        for index in range(len(self.layers)):
            if index not in self.released:
                self.load(index)
                self.release(index, write=True)

    def commit(
        self,
        plan: ModelPlan,
        *,
        tokenizer=None,
        model_card: str | None = None,
        before_commit: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the rest of the checkpoint (as :func:`~moeshrink.io.export.export_checkpoint` does),
        call ``before_commit`` on the finished temporary directory, and rename it to the output."""
        if self.writer is None or self.output is None:
            raise RuntimeError("commit() needs an output directory")
        try:
            with out_of_space_is_an_error(self.output):
                self._finish(self.directory)
                write_extras(
                    self.directory,
                    self.adapter,
                    plan,
                    source=self.path,
                    tokenizer=tokenizer,
                    model_card=model_card,
                )
                if before_commit is not None:
                    before_commit(self.directory)
        except BaseException:
            self.pending.discard()
            raise
        return self.pending.commit()

    def abort(self) -> None:
        """Remove the temporary output directory now."""
        if self.writer is not None:
            self.pending.discard()

    def _finish(self, directory: Path) -> None:
        """Write the tensors outside the decoder layers, the index and config.json (as ``save_pretrained``)."""
        self.release_all()
        state = {k: v for k, v in self.model.state_dict().items() if layer_of(k) is None}
        self.writer.write(self._on_disk(state))
        self.writer.finish(self.model.num_parameters())
        config = self.model.config
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.architectures = serving_architectures(
            config, config.architectures or [type(self.model).__name__]
        )
        config.save_pretrained(directory)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(directory)


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc only; elsewhere a no-op).

    A layer's tensors are tens of MB each, under glibc's adaptive mmap threshold, so they come from
    the heap; without a trim the heap keeps what earlier layers freed and the resident size creeps up
    with the number of layers instead of staying at one layer."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None


def _to_meta(module: nn.Module) -> None:
    """Replace the parameters and saved buffers of ``module`` by meta tensors of the same shape."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(buffer, device="meta")


def estimate_output_bytes(
    reader: ShardReader,
    adapter: FamilyAdapter,
    config,
    keep: int,
    *,
    dtype: str | torch.dtype = "auto",
    refit: bool = False,
) -> int:
    """Bytes of the pruned checkpoint: its tensors, with routed-expert tensors scaled to ``keep`` of the
    experts (an upper bound for merging too: a merged expert is one expert) and floating tensors at
    the ``dtype`` the model is loaded and saved in (``auto`` may mean float32 for a bfloat16 file whose
    config names no dtype); with ``refit`` the re-fitted down projections of the merged experts (at
    most a third of the kept experts' bytes); and the files copied from the input (tokenizer, config)."""
    num_experts = max(adapter.num_experts(config), 1)
    itemsize = torch.empty((), dtype=resolve_dtype(config, dtype)).element_size()
    tensors = expert = 0
    for key, nbytes in reader.nbytes.items():
        if reader.floating.get(key, False):
            nbytes = nbytes // reader.itemsize[key] * itemsize
        tensors += nbytes
        if ".experts." in key and "shared" not in key:
            expert += nbytes
    kept = expert * keep // num_experts
    copied = sum(
        (reader.path / name).stat().st_size
        for name in (*TOKENIZER_FILES, "config.json", "generation_config.json")
        if (reader.path / name).is_file()
    )
    return tensors - expert + kept + (kept // 3 if refit else 0) + copied


# Room asked for beyond the estimate: a few percent of it, and at least a floor. The estimate counts
# every tensor (an upper bound for merges) and the copied files exactly; the margin covers what it
# does not count: the plan and model card (the plan grows with layers x experts, and with neurons
# when merges align them, yet stays well under 1% of the weights of a real model), safetensors
# headers and file-system blocks. The floor covers small outputs, where these fixed-size parts weigh
# most. (The margin used to be 5% plus a fixed 64 MiB, which refused a 10 MiB output on a disk with
# 60 MiB free and meant nothing for a 100 GiB one.)
MARGIN_FRACTION = 0.05
MARGIN_FLOOR = 4 << 20


def free_disk_margin(needed: int) -> int:
    """Bytes asked for beyond an estimated output of ``needed`` bytes."""
    return max(int(needed * MARGIN_FRACTION), MARGIN_FLOOR)


def check_free_disk(output: str | Path, needed: int) -> None:
    """Refuse to start when the output's file system has less room than ``needed`` bytes plus
    :func:`free_disk_margin`. An existing output is replaced only once the new one is complete, so
    while it is written both need room."""
    output = Path(output).absolute()
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = needed + free_disk_margin(needed)
    if free < want:
        replacing = " (beside the output it replaces, removed only once the new one is complete)"
        raise MoeShrinkError(
            f"not enough free disk for the output {output}: it needs about {_size(want)}"
            f"{replacing if output.exists() else ''}, {parent} has {_size(free)} free; free some space "
            "or choose another --output"
        )


def _size(n: int) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def physical_memory_bytes() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Streaming is chosen automatically when the checkpoint's tensors exceed this fraction of the RAM.
AUTO_STREAM_FRACTION = 0.5


def choose_streaming(
    stream: bool | None, reader: ShardReader, output: str | Path | None, unsupported: dict[str, bool]
) -> bool:
    """Whether to stream: as asked, or (``None``) when an output is written, no option needs the
    whole model, and the checkpoint is larger than ``AUTO_STREAM_FRACTION`` of the RAM.
    ``unsupported`` maps option names to whether they are in use."""
    used = [name for name, on in unsupported.items() if on]
    if stream is None:
        big = reader.total_bytes > AUTO_STREAM_FRACTION * physical_memory_bytes()
        return big and output is not None and not used
    if stream and output is None:
        raise MoeShrinkError(
            "--stream writes the pruned layers as it goes: give an output directory (-o DIR)"
        )
    if stream and used:
        raise MoeShrinkError(
            f"--stream does not support {', '.join(used)} yet: drop it, or run without --stream"
        )
    return bool(stream)
