"""Block-wise FP8 (DeepSeek-V3 / Qwen3 FP8 layout): the tensors, their checks, and the arithmetic.

A quantized linear weight ``X.weight`` [rows, cols] is float8_e4m3fn, with ``X.weight_scale_inv``
[ceil(rows / block_rows), ceil(cols / block_cols)] (float32 in DeepSeek-V3) beside it; the real
weight is ``weight[i, j] * weight_scale_inv[i // block_rows, j // block_cols]`` (the last row and
column of tiles may be partial: DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows in 128-row tiles).
Every other tensor (embeddings, norms, routers, anything in ``modules_to_not_convert``) is stored
as it is.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeshrink.errors import MoeShrinkError
from moeshrink.quant import BlockFP8Scheme

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
# Safetensors dtype names: the one weights may have, those refused, those a scale may have.
FP8_NAME = "F8_E4M3"
OTHER_FP8 = ("F8_E5M2", "F8_E8M0", "F4", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
SCALE_DTYPES = ("F32", "BF16", "F16")
# Tensors of static activation quantization (refused: dynamic activations only).
ACTIVATION_SCALES = (".activation_scale", ".input_scale")


def scale_shape(shape: tuple[int, ...] | list[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The ``weight_scale_inv`` shape of a weight of ``shape`` in ``block`` tiles (partial tiles count)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[
        ..., :cols
    ]


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The real weight in ``dtype``: computed in float32, rounded to ``dtype`` once."""
    rows, cols = weight.shape[-2:]
    return (weight.float() * expand_blocks(scale_inv.float(), rows, cols, block)).to(dtype)


def quantize(
    weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as float8_e4m3fn and its ``weight_scale_inv`` per ``block`` tile (each tile's
    largest magnitude maps to the format's largest value, 448), as DeepSeek-V3's conversion does; the
    scale is rounded to ``scale_dtype`` (float32 in DeepSeek-V3, bfloat16 in the Qwen3 FP8 releases)
    before the weight is divided by it, so the stored pair dequantizes as it was computed."""
    rows, cols = weight.shape[-2:]
    tiles = scale_shape(weight.shape, block)
    padded = torch.zeros(*weight.shape[:-2], tiles[-2] * block[0], tiles[-1] * block[1], dtype=torch.float32)
    padded[..., :rows, :cols] = weight.float()
    amax = (
        padded.unflatten(-1, (tiles[-1], block[1]))
        .unflatten(-3, (tiles[-2], block[0]))
        .abs()
        .amax(dim=(-3, -1))
    )
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    quantized = (
        (weight.float() / expand_blocks(scale.float(), rows, cols, block))
        .clamp(-FP8_MAX, FP8_MAX)
        .to(FP8_DTYPE)
    )
    return quantized.contiguous(), scale.contiguous()


def read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a safetensors file: name -> (dtype name, shape), from its header alone."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


@dataclass
class BlockFP8Checkpoint:
    """The FP8 weights of a checkpoint and their scales, checked against its scheme."""

    scheme: BlockFP8Scheme
    scales: dict[str, str]  # FP8 weight name -> its scale's name
    tensors: dict[str, tuple[str, list[int]]]  # every tensor: name -> (safetensors dtype, shape)

    @classmethod
    def scan(cls, path: Path, files: list[Path], scheme: BlockFP8Scheme) -> BlockFP8Checkpoint:
        """Check the shards' headers: every FP8 weight has a scale of the right shape, every scale a
        weight; no other low-precision format; no static activation scales. One-line errors."""
        tensors: dict[str, tuple[str, list[int]]] = {}
        for file in files:
            tensors.update(read_header(file))
        block, scales = scheme.block, {}
        for name, (dtype, shape) in sorted(tensors.items()):
            if dtype in OTHER_FP8:
                raise MoeShrinkError(
                    f"{path}: tensor {name} is {dtype}; moeshrink's block-FP8 support reads float8_e4m3fn "
                    "weights only: dequantize the checkpoint first"
                )
            if name.endswith(ACTIVATION_SCALES):
                raise MoeShrinkError(
                    f"{path}: tensor {name} is a static activation scale; only dynamic activation "
                    "quantization (activation_scheme 'dynamic') is supported: dequantize the checkpoint first"
                )
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix(SCALE_SUFFIX)
                if tensors.get(weight, ("",))[0] != FP8_NAME:
                    raise MoeShrinkError(
                        f"{path}: scale {name} has no float8 weight {weight} beside it: the checkpoint is "
                        "incomplete or not block-FP8; re-download it"
                    )
                continue
            if dtype != FP8_NAME:
                continue
            scale = name + SCALE_SUFFIX
            if len(shape) < 2:
                raise MoeShrinkError(
                    f"{path}: float8 tensor {name} is not a matrix ({shape}); re-download it"
                )
            if scale not in tensors:
                raise MoeShrinkError(
                    f"{path}: float8 weight {name} has no {scale}: the checkpoint's scales are missing; "
                    "re-download it"
                )
            scale_dtype, got = tensors[scale]
            want = list(scale_shape(shape, block))
            if got != want or scale_dtype not in SCALE_DTYPES:
                raise MoeShrinkError(
                    f"{path}: {scale} is {scale_dtype} {got}, but a {shape} weight in the config's "
                    f"{list(block)} blocks needs a float {want}: the scales and weight_block_size disagree; "
                    "re-download the checkpoint or fix quantization_config"
                )
            scales[name] = scale
        if not scales:
            raise MoeShrinkError(
                f"{path}: quantization_config says block-FP8 but no tensor is float8_e4m3fn: the config and "
                "weights disagree; re-download the checkpoint"
            )
        return cls(scheme=scheme, scales=scales, tensors=tensors)

    @property
    def quantized_modules(self) -> set[str]:
        """Names of the modules stored quantized."""
        return {name.removesuffix(".weight") for name in self.scales}

    def parameter_count(self, state: dict[str, torch.Tensor]) -> int:
        """How many weights of the dense model ``state`` stores (scales count 0)."""
        return sum(t.numel() for name, t in state.items() if not name.endswith(SCALE_SUFFIX))

    def dequantize_state(
        self, state: dict[str, torch.Tensor], storage: torch.dtype, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """``state`` (on-disk names) with every FP8 weight dequantized and the scales dropped: what an
        unquantized checkpoint of the same model in the ``storage`` dtype (the config's, bfloat16 in
        the releases) would hold, as ``dtype``. Rounding to the storage dtype first, as DeepSeek's
        own dequantization does, makes the result the same whatever ``dtype`` the work is done in."""
        out = {}
        for name, tensor in state.items():
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self.scales:
                continue
            if name in self.scales:
                tensor = dequantize(tensor, state[self.scales[name]], self.scheme.block, storage).to(dtype)
            out[name] = tensor
        return out


def unexpected_fp8(path: Path, files: list[Path]) -> str | None:
    """The first float8 tensor of a checkpoint that declares no quantization (None when there is none)."""
    for file in files:
        for name, (dtype, _) in read_header(file).items():
            if dtype == FP8_NAME or dtype in OTHER_FP8:
                return name
    return None


__all__ = [
    "FP8_DTYPE",
    "expand_blocks",
    "SCALE_SUFFIX",
    "BlockFP8Checkpoint",
    "dequantize",
    "quantize",
    "scale_shape",
    "unexpected_fp8",
]
