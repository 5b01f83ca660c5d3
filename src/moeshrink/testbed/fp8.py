"""Write a checkpoint as block-FP8, in the layouts the real releases use (tests and demos).

``deepseek``: DeepSeek-V3's layout: every linear weight of the decoder layers except the routers is
float8_e4m3fn with a float32 ``weight_scale_inv`` per tile; ``quantization_config`` is
``{activation_scheme: dynamic, fmt: e4m3, quant_method: fp8, weight_block_size}``.
``qwen3``: the Qwen3 FP8 releases' layout: the same tensors with bfloat16 scales, and
``modules_to_not_convert`` listing what stays unquantized (LM head, embeddings, norms, routers).
Modules named in ``not_converted`` stay unquantized and are listed too (e.g. one expert).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from moeshrink.quant.fp8 import SCALE_SUFFIX, quantize

Style = Literal["deepseek", "qwen3"]


def _is_router(module: str) -> bool:
    return module.endswith((".gate", ".router", "shared_expert_gate"))


def _listed(module: str, names: Sequence[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def is_quantized_weight(name: str, ndim: int, not_converted: Sequence[str] = ()) -> bool:
    """Whether the block-FP8 releases store tensor ``name`` in FP8: every linear weight of the
    decoder layers except the routers and the modules in ``not_converted``."""
    module = name.removesuffix(".weight")
    return (
        name.endswith(".weight")
        and ndim == 2
        and ".layers." in name
        and not _is_router(module)
        and not _listed(module, not_converted)
    )


def block_fp8_config(block: Sequence[int], not_converted: Sequence[str] = ()) -> dict:
    """The ``quantization_config`` of a block-FP8 checkpoint with ``block`` tiles (DeepSeek-V3's keys;
    ``modules_to_not_convert`` only when there are any)."""
    quant: dict = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    if not_converted:
        quant["modules_to_not_convert"] = list(not_converted)
    return quant


def write_block_fp8(
    source: str | Path,
    out_dir: str | Path,
    block: tuple[int, int] = (16, 16),
    *,
    style: Style = "deepseek",
    not_converted: Sequence[str] = (),
) -> Path:
    """Copy the unquantized checkpoint ``source`` (one ``model.safetensors``, per-expert keys) to
    ``out_dir`` as block-FP8 of ``block`` tiles in ``style``'s layout."""
    source, out_dir = Path(source), Path(out_dir)
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    scale_dtype = torch.float32 if style == "deepseek" else torch.bfloat16
    state = load_file(source / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if is_quantized_weight(name, tensor.ndim, not_converted):
            out[name], scale = quantize(tensor, block)
            out[name + SCALE_SUFFIX] = scale.to(scale_dtype)
        else:
            out[name] = tensor
            if name.endswith(".weight"):
                skipped.append(module)
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    listed = sorted(skipped) if style == "qwen3" else sorted(m for m in skipped if _listed(m, not_converted))
    config["quantization_config"] = block_fp8_config(block, listed)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


__all__ = ["block_fp8_config", "is_quantized_weight", "write_block_fp8"]
