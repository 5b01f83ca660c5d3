"""Write a checkpoint as compressed-tensors, in the layout llm-compressor writes (tests and demos).

llm-compressor (which pins another transformers than moeshrink's) quantizes every ``Linear`` but
those ignored and saves each module's tensors through ``compressed_tensors.compressors``: this
writer produces the same tensor names, dtypes and shapes, and the same ``quantization_config``
(``config_groups`` targeting ``Linear``, ``ignore`` listing the Linear modules left unquantized by
name: the LM head, the routers, any module in ``not_converted``). The scales are min-max ones
(llm-compressor's default observer for these presets); the tests check the package decompresses
these files to what moeshrink's dequantization gives, where the package is installed.

Presets (compressed-tensors' names): ``FP8_DYNAMIC`` (float8 weights, one scale per output channel,
dynamic per-token activations), ``FP8`` (one scale per tensor, static activation scales stored as
``input_scale``), ``FP8_BLOCK`` (float8 in ``block`` tiles), ``W8A8`` (int8 per channel, int8 dynamic
activations: ``int-quantized``), ``W4A16`` / ``W4A16_ASYM`` (int4 in groups of ``group_size`` packed
eight to an int32: ``pack-quantized``; the asymmetric one with zero points packed along rows).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeshrink.quant.ctensors import quantize as compress_weight  # the one implementation (re-exported)
from moeshrink.testbed.fp8 import write_block_fp8

_FLOAT8 = {"num_bits": 8, "type": "float", "symmetric": True}
_TOKEN = {"strategy": "token", "dynamic": True, "group_size": None, "block_structure": None}
PRESETS: dict[str, dict[str, Any]] = {
    "FP8_DYNAMIC": {
        "format": "float-quantized",
        "weights": {**_FLOAT8, "strategy": "channel"},
        "input_activations": {**_FLOAT8, **_TOKEN},
    },
    "FP8": {
        "format": "float-quantized",
        "weights": {**_FLOAT8, "strategy": "tensor"},
        "input_activations": {**_FLOAT8, "strategy": "tensor", "dynamic": False},
    },
    "FP8_BLOCK": {
        "format": "float-quantized",
        "weights": {**_FLOAT8, "strategy": "block"},
        "input_activations": {**_FLOAT8, "strategy": "group", "dynamic": True},
    },
    "W8A8": {
        "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, **_TOKEN},
    },
    "W4A16": {
        "format": "pack-quantized",
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"},
        "input_activations": None,
    },
    "W4A16_ASYM": {
        "format": "pack-quantized",
        "weights": {
            "num_bits": 4,
            "type": "int",
            "symmetric": False,
            "strategy": "group",
            "zp_dtype": "torch.int8",
        },
        "input_activations": None,
    },
}


def _args(spec: dict[str, Any]) -> dict[str, Any]:
    """QuantizationArgs as compressed-tensors serialises them (every field)."""
    base = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
    }
    return base | spec


def quantization_config(
    preset: str, ignore: Sequence[str], group_size: int = 128, block: tuple[int, int] = (128, 128)
) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor writes for ``preset``."""
    spec = PRESETS[preset]
    weights = dict(spec["weights"])
    if weights["strategy"] == "group":
        weights["group_size"] = group_size
    if weights["strategy"] == "block":
        weights["block_structure"] = list(block)
    activations = spec["input_activations"]
    if activations is not None:
        activations = _args(
            activations | ({"group_size": block[1]} if activations["strategy"] == "group" else {})
        )
        activations["observer"] = None if activations["dynamic"] else "static_minmax"
    group = {
        "targets": ["Linear"],
        "weights": _args(weights),
        "input_activations": activations,
        "output_activations": None,
        "format": spec["format"],
    }
    return {
        "config_groups": {"group_0": group},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": spec["format"],
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.17.0",
    }


def _is_router(module: str) -> bool:
    return module.endswith((".gate", ".router", "shared_expert_gate"))


def write_compressed_tensors(
    source: str | Path,
    out_dir: str | Path,
    preset: str = "W4A16",
    *,
    group_size: int = 16,
    block: tuple[int, int] = (16, 16),
    not_converted: Sequence[str] = (),
) -> Path:
    """Copy the unquantized checkpoint ``source`` (one ``model.safetensors``, per-expert keys) to
    ``out_dir`` as compressed-tensors ``preset``: every Linear weight of the decoder layers but the
    routers and the modules in ``not_converted`` quantized; those and the LM head in ``ignore``."""
    from moeshrink.quant import weight_group

    source, out_dir = Path(source), Path(out_dir)
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = load_file(source / "model.safetensors")
    ignored = ["lm_head"] if "lm_head.weight" in state else []
    config = quantization_config(preset, [], group_size, block)
    group = weight_group(out_dir, "", "group_0", config["config_groups"]["group_0"], config["format"])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and tensor.ndim == 2 and ".layers." in name
        if linear and (_is_router(module) or module in not_converted):
            ignored.append(module)
        if not linear or _is_router(module) or module in not_converted:
            out[name] = tensor
            continue
        for local, value in compress_weight(tensor, group).items():
            out[f"{module}.{local}"] = value.contiguous()
        if (PRESETS[preset]["input_activations"] or {}).get("dynamic") is False:  # a static activation scale
            out[f"{module}.input_scale"] = torch.tensor([0.01], dtype=tensor.dtype)
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    config["ignore"] = sorted(ignored)
    raw = json.loads((out_dir / "config.json").read_text())
    raw["quantization_config"] = config
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out_dir


def quantized_copies(dense: str | Path, root: str | Path) -> dict[str, Path]:
    """``dense`` written under ``root`` in every quantized layout the benchmarks compare: block-FP8 in
    16x16 tiles (DeepSeek-V3's layout) and each compressed-tensors preset, by a readable name."""
    root = Path(root)
    copies = {"block-FP8 16x16": write_block_fp8(dense, root / "fp8", (16, 16))}
    for preset in PRESETS:
        copies[f"compressed-tensors {preset}"] = write_compressed_tensors(dense, root / preset, preset)
    return copies


__all__ = [
    "PRESETS",
    "compress_weight",
    "quantization_config",
    "quantized_copies",
    "write_compressed_tensors",
]
