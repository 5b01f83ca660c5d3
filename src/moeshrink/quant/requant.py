"""Re-quantize a weight the job changed (a merged, re-fitted or sparsified expert) in the input's scheme.

A changed module is written in its layout source's scheme and layout (the input module it copies, or a
merged expert's first quantized source): block-FP8 in the config's tiles with the stored scale's dtype
(:func:`moeshrink.quant.fp8.quantize`); compressed-tensors in the module's config group (format,
strategy, group size or block, symmetry; scale and zero-point dtypes as stored:
:func:`moeshrink.quant.ctensors.quantize`). Two ways, chosen by what changed:

- **zeros only** (sparsity inside an expert): when every non-zero entry of the computed weight equals
  the source's dequantized entry, the source's scales (and zero points) are kept and only the zeroed
  entries' codes change, to the code of 0. The written weight is then exactly the computed one
  (relative error 0) and the zeros are exact in every scheme.
- **anything else** (a merge, a re-fitted down projection): the computed weight, rounded to the
  checkpoint's storage dtype (what quantizing the dense checkpoint would see), is quantized with
  round-to-nearest min-max scales, as the input's tools write them (DeepSeek-V3's block-FP8
  conversion, llm-compressor's default observer).

Either way the relative Frobenius error ``||dequantize(written) - computed|| / ||computed||`` is
measured on the written tensors and returned, for the plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from moeshrink.quant import BlockFP8Scheme, fp8
from moeshrink.quant import ctensors as ct


@dataclass
class Requantized:
    """A changed module's tensors (local names: ``weight``, ``weight_scale_inv`` ...) and their error."""

    tensors: dict[str, torch.Tensor]
    error: float
    kept_scales: bool  # zeros only: the source's scales kept, only zeroed codes changed


def digest(tensor: torch.Tensor) -> bytes:
    """A fingerprint of a tensor's dtype, shape and values (equal digests: bit-identical tensors, but
    for the sign of zeros: a kept expert that went through a merge's arithmetic as a cluster of one,
    ``0.0 + 1.0 * w``, has lost its -0.0 entries and is still the expert it was)."""
    t = tensor.detach()
    if t.is_floating_point():
        t = t + 0.0  # -0.0 + 0.0 = +0.0
    t = t.contiguous().reshape(-1)
    h = hashlib.blake2b(f"{t.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.digest()


def dequantize_module(
    checkpoint: fp8.BlockFP8Checkpoint | ct.CompressedTensorsCheckpoint,
    module: str,
    stored: dict[str, torch.Tensor],
    storage: torch.dtype,
) -> torch.Tensor:
    """The real weight of input ``module`` (``stored``: its tensors by local name) in ``storage``, as
    the checkpoint's ``dequantize_state`` computes it."""
    if isinstance(checkpoint.scheme, BlockFP8Scheme):
        return fp8.dequantize(
            stored["weight"], stored["weight" + fp8.SCALE_SUFFIX], checkpoint.scheme.block, storage
        )
    layout = checkpoint.modules[module]
    return ct.dequantize(
        layout.group,
        stored[layout.stored.rpartition(".")[2]],
        stored["weight_scale"],
        stored.get("weight_zero_point") if not layout.group.symmetric else None,
        stored.get("weight_g_idx"),
        (layout.rows, layout.cols),
    ).to(storage)


def _zero_codes(
    checkpoint: fp8.BlockFP8Checkpoint | ct.CompressedTensorsCheckpoint,
    module: str,
    stored: dict[str, torch.Tensor],
    zeros: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The source's tensors with the entries at ``zeros`` set to the code that dequantizes to 0."""
    out = dict(stored)
    if isinstance(checkpoint.scheme, BlockFP8Scheme):
        out["weight"] = stored["weight"].view(torch.uint8).masked_fill(zeros, 0).view(fp8.FP8_DTYPE)
        return out
    layout = checkpoint.modules[module]
    group = layout.group
    if group.format != "pack-quantized":
        q = stored["weight"]
        if group.type == "float":
            out["weight"] = q.view(torch.uint8).masked_fill(zeros, 0).view(q.dtype)
        elif group.symmetric:
            out["weight"] = q.masked_fill(zeros, 0)
        else:
            zero = ct._expand_to(stored["weight_zero_point"], group, layout.rows, layout.cols, None)
            out["weight"] = torch.where(zeros, zero.to(q.dtype).expand_as(q), q)
        return out
    q = ct.unpack_int32(stored["weight_packed"], group.num_bits, layout.cols)
    if group.symmetric:
        q = q.masked_fill(zeros, 0)
    else:
        zp = stored["weight_zero_point"]
        if group.strategy in ("group", "channel"):
            zp = ct.unpack_int32(zp, group.num_bits, layout.rows, dim=0)
        zero = ct._expand_to(zp, group, layout.rows, layout.cols, None).to(torch.int8)
        q = torch.where(zeros, zero.expand_as(q), q)
    out["weight_packed"] = ct.pack_int32(q, group.num_bits)
    return out


def requantize(
    checkpoint: fp8.BlockFP8Checkpoint | ct.CompressedTensorsCheckpoint,
    module: str,
    stored: dict[str, torch.Tensor],
    computed: torch.Tensor,
    storage: torch.dtype,
) -> Requantized:
    """``computed`` (the job's weight for a module) in the scheme and layout of input ``module``, whose
    tensors are ``stored`` (local names); ``storage``: the dense checkpoint's dtype."""
    source = dequantize_module(checkpoint, module, stored, storage).to(computed.dtype)
    zeros = computed == 0
    if bool(zeros.any()) and torch.equal(computed[~zeros], source[~zeros]):
        tensors, kept = _zero_codes(checkpoint, module, stored, zeros), True
    else:
        weight = computed.to(storage)
        if isinstance(checkpoint.scheme, BlockFP8Scheme):
            scale_name = "weight" + fp8.SCALE_SUFFIX
            q, scale = fp8.quantize(weight, checkpoint.scheme.block, stored[scale_name].dtype)
            tensors = {"weight": q, scale_name: scale}
        else:
            group = checkpoint.modules[module].group
            tensors = ct.quantize(weight, group, stored["weight_scale"].dtype)
            for name in ("weight_zero_point", "weight_shape"):
                if name in tensors and name in stored and tensors[name].dtype != stored[name].dtype:
                    tensors[name] = tensors[name].to(stored[name].dtype)
        kept = False
    written = dequantize_module(checkpoint, module, tensors, storage).float()
    want = computed.float()
    norm = float(want.norm())
    error = float((written - want).norm()) / norm if norm > 0 else float((written - want).norm())
    return Requantized(tensors={k: v.contiguous() for k, v in tensors.items()}, error=error, kept_scales=kept)


def summarize(errors: list[tuple[str, float, bool]]) -> dict[str, object]:
    """One layer's (or the model's) re-quantized tensors: how many, how many kept their scales (zeros
    only), and the mean and largest relative error (with the tensor it was largest for)."""
    if not errors:
        return {"tensors": 0}
    worst = max(errors, key=lambda e: e[1])
    return {
        "tensors": len(errors),
        "kept_scales": sum(e[2] for e in errors),
        "mean_relative_error": sum(e[1] for e in errors) / len(errors),
        "max_relative_error": worst[1],
        "max_tensor": worst[0],
    }


__all__ = ["Requantized", "dequantize_module", "digest", "requantize", "summarize"]
