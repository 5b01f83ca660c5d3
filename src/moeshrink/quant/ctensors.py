"""compressed-tensors (llm-compressor's format): the tensors, their checks, and the arithmetic.

A quantized Linear ``X`` of a config group stores, as ``compressed_tensors.compressors`` writes it:

- ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: ``X.weight`` [rows, cols] as
  float8_e4m3fn or int8;
- ``pack-quantized``: ``X.weight_packed`` [rows, ceil(cols / (32 // bits))] int32 (each int32 holds
  ``32 // bits`` values, lowest bits first, offset by ``2 ** (bits - 1)``) and ``X.weight_shape``
  ([rows, cols], int64);
- ``X.weight_scale`` by the weights' strategy: tensor [1], channel [rows, 1], group
  [rows, ceil(cols / group_size)], block [ceil(rows / h), ceil(cols / w)];
- ``X.weight_zero_point`` when asymmetric (the scale's shape; packed along rows as int32 for
  pack-quantized group/channel), ``X.weight_g_idx`` [cols] with group activation ordering, and
  activation tensors (``X.input_scale`` ...) for static activation quantization.

The real weight is ``(q - zero_point) * scale`` computed in the scale's dtype, as
``compressed_tensors.quantization.lifecycle.forward.dequantize`` computes it (the same bits;
tested against the package where it is installed). Every other tensor is stored as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moeshrink.errors import MoeShrinkError
from moeshrink.quant import CompressedTensorsScheme, WeightGroup
from moeshrink.quant.fp8 import FP8_MAX, FP8_NAME, OTHER_FP8, SCALE_DTYPES, expand_blocks, read_header

# The tensors compressed-tensors adds to a module (never parameters of the dense model).
WEIGHT_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
ACTIVATION_PARAMS = (
    "weight_global_scale",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
    "k_scale",
    "v_scale",
    "q_scale",
    "k_zero_point",
    "v_zero_point",
)
AUXILIARY = frozenset(WEIGHT_PARAMS + ACTIVATION_PARAMS)
INT_NAMES = ("I64", "I32", "I16", "I8")


def pack_factor(bits: int) -> int:
    """How many ``bits``-bit values one int32 holds."""
    return 32 // bits


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The signed int8 values packed into ``packed`` along ``dim`` (``size`` of them, padding dropped)."""
    value = packed if dim == 1 else packed.t()
    factor, mask = pack_factor(bits), (1 << bits) - 1
    out = torch.zeros(value.shape[0], value.shape[1] * factor, dtype=torch.int32)
    for i in range(factor):
        out[:, i::factor] = (value >> (bits * i)) & mask
    out = (out[:, :size] - (1 << (bits - 1))).to(torch.int8)
    return out if dim == 1 else out.t().contiguous()


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """``values`` (int8 in the signed ``bits``-bit range) packed into int32 along ``dim``."""
    value = values if dim == 1 else values.t()
    factor = pack_factor(bits)
    unsigned = (value.to(torch.int32) + (1 << (bits - 1))).to(torch.int32)
    columns = math.ceil(unsigned.shape[1] / factor) * factor
    unsigned = torch.nn.functional.pad(unsigned, (0, columns - unsigned.shape[1]))
    shifts = torch.arange(factor, dtype=torch.int32) * bits
    packed = (unsigned.view(unsigned.shape[0], -1, factor) << shifts).sum(dim=2, dtype=torch.int32)
    return packed if dim == 1 else packed.t().contiguous()


def scale_shape(group: WeightGroup, rows: int, cols: int) -> tuple[int, ...]:
    """The ``weight_scale`` shape of a [rows, cols] weight in ``group``'s layout."""
    if group.strategy == "tensor":
        return (1,)
    if group.strategy == "channel":
        return (rows, 1)
    if group.strategy == "group":
        return (rows, math.ceil(cols / group.group_size))
    assert group.block is not None
    return (math.ceil(rows / group.block[0]), math.ceil(cols / group.block[1]))


def quantize(
    weight: torch.Tensor, group: WeightGroup, scale_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One Linear's compressed tensors in ``group``'s layout (local names, as
    ``compressed_tensors.compressors`` names them): min-max scales (llm-compressor's default observer
    for its presets) rounded to ``scale_dtype`` (default: the weight's dtype, as the package does),
    the values divided in the weight's dtype (the package's arithmetic: the same bits, tested against
    it in ``tests/vllm/test_ctensors_package.py``). The one quantization of this module: the test
    checkpoints (``moeshrink.testbed.ctensors``) and re-quantized experts (``moeshrink.quant.requant``)."""
    rows, cols = weight.shape
    w = weight.float()
    if group.strategy == "group" and cols > group.group_size and cols % group.group_size:
        raise MoeShrinkError(
            f"a [{rows}, {cols}] weight cannot be quantized in groups of {group.group_size} columns (not a "
            "multiple): compressed-tensors needs whole groups; choose a group_size that divides the columns"
        )
    if group.strategy == "block":
        assert group.block is not None
        block = group.block
        tiles = scale_shape(group, rows, cols)
        padded = torch.zeros(tiles[0] * block[0], tiles[1] * block[1])
        padded[:rows, :cols] = w.abs()
        amax = padded.unflatten(1, (tiles[1], block[1])).unflatten(0, (tiles[0], block[0])).amax(dim=(1, 3))
        lo, hi = -amax, amax

        def expand(t: torch.Tensor) -> torch.Tensor:
            return expand_blocks(t, rows, cols, block)

    else:
        size = min(group.group_size or cols, cols)
        if group.strategy == "tensor":
            view = w.reshape(1, 1, -1)
        elif group.strategy == "channel":
            view = w.reshape(rows, 1, cols)
        else:
            view = w.reshape(rows, -1, size)
        lo, hi = view.amin(-1).clamp(max=0), view.amax(-1).clamp(min=0)
        shape = scale_shape(group, rows, cols)
        lo, hi = lo.reshape(shape), hi.reshape(shape)

        def expand(t: torch.Tensor) -> torch.Tensor:
            if group.strategy == "tensor":
                return t.reshape(1, 1)
            if group.strategy == "channel":
                return t
            return t.repeat_interleave(size, dim=1)[:, :cols]

    dtype = scale_dtype or weight.dtype  # the package quantizes in the weight's dtype: so does this
    if group.type == "float":
        scale = (torch.maximum(hi, -lo) / FP8_MAX).clamp(min=1e-12).to(dtype)
        q = (weight / expand(scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": scale}
    qmin, qmax = -(1 << (group.num_bits - 1)), (1 << (group.num_bits - 1)) - 1
    out: dict[str, torch.Tensor] = {}
    if group.symmetric:
        scale = (torch.maximum(hi, -lo) * 2 / (qmax - qmin)).clamp(min=1e-12).to(dtype)
        q = torch.round((weight / expand(scale)).clamp(qmin, qmax)).to(torch.int8)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12).to(dtype)
        zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax).to(torch.int8)
        q = torch.round((weight / expand(scale) + expand(zero).to(weight.dtype)).clamp(qmin, qmax)).to(
            torch.int8
        )
    out["weight_scale"] = scale
    if group.format == "pack-quantized":
        out["weight_packed"] = pack_int32(q, group.num_bits)
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if not group.symmetric:
            out["weight_zero_point"] = pack_int32(zero, group.num_bits, dim=0)
    else:
        out["weight"] = q
        if not group.symmetric:
            out["weight_zero_point"] = zero
    return out


def _expand_to(
    t: torch.Tensor, group: WeightGroup, rows: int, cols: int, g_idx: torch.Tensor | None
) -> torch.Tensor:
    """A scale (or zero point) of ``group``'s layout as one value per weight element (or broadcastable)."""
    if group.strategy == "tensor":
        return t.reshape(1, 1)
    if group.strategy == "channel":
        return t.reshape(rows, 1)
    if group.strategy == "group":
        ordered = g_idx is None or bool((g_idx == -1).any())
        index = torch.arange(cols) // group.group_size if ordered else g_idx.long()
        return t.index_select(1, index)
    assert group.block is not None
    return expand_blocks(t, rows, cols, group.block)


def dequantize(
    group: WeightGroup,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The real weight, in the scale's dtype: ``weight`` is the stored ``weight`` (float8 / int8) or
    ``weight_packed`` (int32, with ``shape`` = [rows, cols] from ``weight_shape``)."""
    if group.format == "pack-quantized":
        assert shape is not None
        rows, cols = shape
        q = unpack_int32(weight, group.num_bits, cols)
        if zero_point is not None and group.strategy in ("group", "channel"):
            zero_point = unpack_int32(zero_point, group.num_bits, rows, dim=0)
    else:
        q = weight
        rows, cols = weight.shape
    out = q.to(scale.dtype)
    if zero_point is not None:
        out = out - _expand_to(zero_point, group, rows, cols, g_idx).to(scale.dtype)
    return out * _expand_to(scale, group, rows, cols, g_idx)


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name


def _is_class(target: str) -> bool:
    """A class-name target (``Linear``): every quantized module on disk is a Linear."""
    return not target.startswith("re:") and target[:1].isupper() and "." not in target


def group_of(scheme: CompressedTensorsScheme, module: str) -> tuple[str, WeightGroup] | None:
    """The config group that quantizes ``module``: one naming it (by name or regex) first, else one
    targeting a class (compressed-tensors' order of precedence)."""
    for name, group in scheme.groups.items():
        if any(not _is_class(t) and _matches(module, t) for t in group.targets):
            return name, group
    for name, group in scheme.groups.items():
        if any(_is_class(t) for t in group.targets):
            return name, group
    return None


@dataclass(frozen=True)
class QuantizedModule:
    """A quantized Linear on disk: its config group and the real weight's shape."""

    name: str
    group: WeightGroup
    rows: int
    cols: int

    @property
    def stored(self) -> str:
        """The name of the tensor that holds the quantized values."""
        return (
            f"{self.name}.weight_packed" if self.group.format == "pack-quantized" else f"{self.name}.weight"
        )


# An ignore entry that names one routed expert by a regex (its number cannot be renumbered).
_EXPERT_REGEX = re.compile(r"experts\\?\.\d")


@dataclass
class CompressedTensorsCheckpoint:
    """The quantized modules of a compressed-tensors checkpoint, checked against its config."""

    scheme: CompressedTensorsScheme
    modules: dict[str, QuantizedModule]  # module name -> its layout
    tensors: dict[str, tuple[str, list[int]]]  # every tensor: name -> (safetensors dtype, shape)

    @property
    def quantized_modules(self) -> set[str]:
        """Names of the modules stored quantized."""
        return set(self.modules)

    @classmethod
    def scan(
        cls, path: Path, files: list[Path], scheme: CompressedTensorsScheme
    ) -> CompressedTensorsCheckpoint:
        """Check the shards: every quantized weight has a scale (and zero point, shape) of its group's
        layout, every scale a quantized weight; no other low-precision format. Headers only, but for
        the pack-quantized ``weight_shape`` values (two integers each). One-line errors."""
        tensors: dict[str, tuple[str, list[int]]] = {}
        where: dict[str, Path] = {}
        for file in files:
            header = read_header(file)
            tensors.update(header)
            where.update(dict.fromkeys(header, file))
        for entry in scheme.ignored:
            if entry.startswith("re:") and _EXPERT_REGEX.search(entry):
                raise MoeShrinkError(
                    f"{path}: the ignore list's {entry!r} names a routed expert by a regex, which moeshrink cannot "
                    "renumber when it prunes: list the expert's modules by name"
                )
        modules: dict[str, QuantizedModule] = {}
        for name, (dtype, shape) in sorted(tensors.items()):
            module, _, suffix = name.rpartition(".")
            if dtype in OTHER_FP8:
                raise MoeShrinkError(
                    f"{path}: tensor {name} is {dtype}; moeshrink reads compressed-tensors float8_e4m3fn, int8 and "
                    "int32-packed weights only: decompress the checkpoint first"
                )
            packed = suffix == "weight_packed"
            if not (packed or (suffix == "weight" and dtype in (FP8_NAME, "I8"))):
                continue
            found = group_of(scheme, module)
            if found is None:
                raise MoeShrinkError(
                    f"{path}: {name} is stored quantized but no config group of quantization_config targets "
                    f"{module}: the config and weights disagree; re-download the checkpoint"
                )
            group_name, group = found
            want = (
                "I32" if group.format == "pack-quantized" else (FP8_NAME if group.type == "float" else "I8")
            )
            if dtype != want or packed != (group.format == "pack-quantized") or len(shape) != 2:
                raise MoeShrinkError(
                    f"{path}: {name} is {dtype} {shape}, but config group {group_name!r} ({group.format}, "
                    f"{group.type}{group.num_bits}) stores {want} matrices: the config and weights disagree; "
                    "re-download the checkpoint"
                )
            modules[module] = cls._check_module(path, tensors, module, shape, group, group_name, where)
        for name in tensors:
            module, _, suffix = name.rpartition(".")
            if suffix in WEIGHT_PARAMS and module not in modules:
                raise MoeShrinkError(
                    f"{path}: {name} has no quantized weight beside it: the checkpoint is incomplete or its config "
                    "and weights disagree; re-download it"
                )
        if not modules:
            raise MoeShrinkError(
                f"{path}: quantization_config says compressed-tensors but no weight is stored quantized: the config "
                "and weights disagree; re-download the checkpoint"
            )
        return cls(scheme=scheme, modules=modules, tensors=tensors)

    @staticmethod
    def _check_module(
        path: Path,
        tensors: dict[str, tuple[str, list[int]]],
        module: str,
        shape: list[int],
        group: WeightGroup,
        group_name: str,
        where: dict[str, Path],
    ) -> QuantizedModule:
        """One quantized module's tensors against its group's layout."""

        def need(suffix: str) -> tuple[str, list[int]]:
            if f"{module}.{suffix}" not in tensors:
                raise MoeShrinkError(
                    f"{path}: quantized weight of {module} has no {module}.{suffix} (config group {group_name!r}, "
                    f"{group.format}): the checkpoint's scales are missing; re-download it"
                )
            return tensors[f"{module}.{suffix}"]

        rows, cols = shape
        if group.format == "pack-quantized":
            dtype, dims = need("weight_shape")
            if dtype not in INT_NAMES or dims != [2]:
                raise MoeShrinkError(
                    f"{path}: {module}.weight_shape is {dtype} {dims}, not two integers: re-download the checkpoint"
                )
            from safetensors import safe_open

            with safe_open(where[f"{module}.weight_shape"], "pt") as f:
                rows, cols = (int(v) for v in f.get_tensor(f"{module}.weight_shape").tolist())
            factor = pack_factor(group.num_bits)
            if shape != [rows, math.ceil(cols / factor)]:
                raise MoeShrinkError(
                    f"{path}: {module}.weight_packed is {shape}, but weight_shape [{rows}, {cols}] packed "
                    f"{factor} to an int32 needs [{rows}, {math.ceil(cols / factor)}]: re-download the checkpoint"
                )
        if group.strategy == "group" and cols > group.group_size and cols % group.group_size:
            raise MoeShrinkError(
                f"{path}: {module} has {cols} columns, not a multiple of config group {group_name!r}'s group_size "
                f"{group.group_size}: the config and weights disagree; re-download the checkpoint"
            )
        dtype, got = need("weight_scale")
        want = list(scale_shape(group, rows, cols))
        fits = got == want or (group.strategy == "tensor" and math.prod(got) == 1)
        if not fits or dtype not in SCALE_DTYPES:
            raise MoeShrinkError(
                f"{path}: {module}.weight_scale is {dtype} {got}, but a [{rows}, {cols}] weight of config group "
                f"{group_name!r} ({group.strategy} strategy) needs a float {want}: the scales and the config "
                "disagree; re-download the checkpoint or fix quantization_config"
            )
        if not group.symmetric:
            dtype, got_zp = need("weight_zero_point")
            packed_zp = group.format == "pack-quantized" and group.strategy in ("group", "channel")
            want_zp = [math.ceil(rows / pack_factor(group.num_bits)), got[1]] if packed_zp else got
            if got_zp != want_zp or dtype not in (INT_NAMES + SCALE_DTYPES):
                raise MoeShrinkError(
                    f"{path}: {module}.weight_zero_point is {dtype} {got_zp}, but config group {group_name!r} needs "
                    f"{want_zp}: re-download the checkpoint"
                )
        if f"{module}.weight_g_idx" in tensors and tensors[f"{module}.weight_g_idx"][1] != [cols]:
            raise MoeShrinkError(
                f"{path}: {module}.weight_g_idx is {tensors[f'{module}.weight_g_idx'][1]}, not [{cols}]: "
                "re-download the checkpoint"
            )
        return QuantizedModule(name=module, group=group, rows=rows, cols=cols)

    def parameter_count(self, state: dict[str, torch.Tensor]) -> int:
        """How many weights of the dense model ``state`` stores (a packed weight counts as its
        ``weight_shape``; scales and the like count 0), whatever its tensors are named."""
        total = 0
        for name, tensor in state.items():
            module, _, suffix = name.rpartition(".")
            if suffix == "weight_packed":
                total += math.prod(int(v) for v in state[f"{module}.weight_shape"].tolist())
            elif suffix not in AUXILIARY:
                total += tensor.numel()
        return total

    def dequantize_state(
        self, state: dict[str, torch.Tensor], storage: torch.dtype, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """``state`` (on-disk names) with every quantized weight dequantized and compressed-tensors' own
        tensors dropped: what the dense checkpoint in the ``storage`` dtype would hold, as ``dtype``."""
        out = {}
        for name, tensor in state.items():
            module, _, suffix = name.rpartition(".")
            if suffix in AUXILIARY:
                continue
            if suffix == "weight" and module in self.modules:
                continue
            out[name] = tensor
        for module, layout in self.modules.items():
            if layout.stored not in state:
                continue
            weight = dequantize(
                layout.group,
                state[layout.stored],
                state[f"{module}.weight_scale"],
                state.get(f"{module}.weight_zero_point") if not layout.group.symmetric else None,
                state.get(f"{module}.weight_g_idx"),
                (layout.rows, layout.cols),
            )
            out[f"{module}.weight"] = weight.to(storage).to(dtype)
        return out


__all__ = [
    "AUXILIARY",
    "CompressedTensorsCheckpoint",
    "QuantizedModule",
    "dequantize",
    "group_of",
    "pack_int32",
    "quantize",
    "scale_shape",
    "unpack_int32",
]
