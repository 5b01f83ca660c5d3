"""Quantized checkpoints in: which scheme a checkpoint uses, and whether moeshrink can work on it.

Read from the checkpoint's files alone, before any weight is read (:func:`read_quantization`):
``quantization_config`` in ``config.json`` (or ``compression_config``, compressed-tensors' older key),
else a ``quantization_config.json`` beside it; the stand-alone files other tools write
(``quantize_config.json``: AutoGPTQ, ``quant_config.json``: AutoAWQ, ``hf_quant_config.json``:
ModelOpt) are recognised too, so that their checkpoints are refused by name.

Supported: block-wise FP8 as DeepSeek-V3 and the Qwen3 FP8 releases store it
(:class:`BlockFP8Scheme`, :mod:`moeshrink.quant.fp8`). Every other scheme is refused in one line
naming it and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeshrink.errors import MoeShrinkError

# Stand-alone files that hold a quantization config, in the order they are looked for.
QUANT_CONFIG_FILES = (
    "quantization_config.json",
    "quantize_config.json",
    "quant_config.json",
    "hf_quant_config.json",
)

# Ignore-list keys of a quantization config (module names left unquantized).
IGNORE_KEYS = ("modules_to_not_convert", "ignored_layers", "ignore")

# What to do with a scheme moeshrink does not handle, by quant_method.
_ADVICE = {
    "gptq": "dequantize it first (GPTQModel / AutoGPTQ, or transformers with a GPU) and prune the dense checkpoint",
    "awq": "dequantize it first (AutoAWQ or llm-compressor) and prune the dense checkpoint",
    "bitsandbytes": "prune the dense checkpoint it was made from (bitsandbytes quantizes at load time), then "
    "quantize the output",
    "mxfp4": "dequantize it first (transformers: Mxfp4Config(dequantize=True), then save_pretrained)",
    "modelopt": "dequantize it first with NVIDIA ModelOpt, or prune the dense checkpoint it was made from",
    "compressed-tensors": "decompress it first (llm-compressor / compressed-tensors) or prune the dense "
    "checkpoint it was made from; compressed-tensors input is planned (issue #15)",
}
_DEFAULT_ADVICE = "dequantize it first with the tool that made it, and prune the dense checkpoint"


@dataclass(frozen=True)
class BlockFP8Scheme:
    """Block-wise FP8 (``quant_method: fp8``): float8_e4m3fn weights, one ``weight_scale_inv`` per
    ``block`` (rows, columns) tile, dequantized as ``weight * scale_inv[row // rows, col // cols]``."""

    block: tuple[int, int]
    config: dict[str, Any]
    # where the config came from: "config.json" or a stand-alone file (written back the same way)
    origin: str = "config.json"
    ignored: tuple[str, ...] = field(default_factory=tuple)

    name = "block-FP8"

    def describe(self) -> dict[str, Any]:
        """What the plan records of the scheme."""
        return {
            "scheme": self.name,
            "quant_method": self.config.get("quant_method"),
            "weight_block_size": list(self.block),
            "config_file": self.origin,
        }


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeShrinkError(f"{file} is not valid JSON ({e}): re-download the checkpoint") from e
    if not isinstance(data, dict):
        raise MoeShrinkError(f"{file} is not a JSON object: re-download the checkpoint")
    return data


def _scheme_name(config: dict[str, Any], origin: str) -> str:
    """The scheme's name as its tools call it (``quant_method``, or what the file implies)."""
    method = config.get("quant_method") or config.get("quant_algo") or config.get("format")
    if config.get("load_in_4bit") or config.get("load_in_8bit") or config.get("_load_in_4bit"):
        method = "bitsandbytes"
    if origin == "quantize_config.json" and not method:
        method = "gptq"
    if origin == "quant_config.json" and not method:
        method = "awq"
    if origin == "hf_quant_config.json":
        method = "modelopt"
    return str(method or "unknown").lower()


def read_quantization(path: Path) -> BlockFP8Scheme | None:
    """The checkpoint's quantization scheme (None: not quantized); any scheme moeshrink cannot
    work on is refused here with a one-line :class:`MoeShrinkError`."""
    raw = _read_json(path / "config.json")
    config, origin = None, "config.json"
    for key in ("quantization_config", "compression_config"):
        if isinstance(raw.get(key), dict):
            config = raw[key]
            break
    if config is None:
        for name in QUANT_CONFIG_FILES:
            if (path / name).is_file():
                config, origin = _read_json(path / name), name
                break
    if config is None:
        return None
    method = _scheme_name(config, origin)
    where = f"{path / origin}" + (" (quantization_config)" if origin == "config.json" else "")
    if method != "fp8":
        scheme = {"compressed_tensors": "compressed-tensors"}.get(method, method)
        variant = config.get("quant_algo") or (
            config.get("format") if scheme == "compressed-tensors" else None
        )
        detail = f" ({variant})" if variant else ""
        raise MoeShrinkError(
            f"{path} is a {scheme}{detail} quantized checkpoint ({where}): moeshrink prunes block-FP8 "
            f"(quant_method fp8 with weight_block_size) and unquantized checkpoints only; "
            f"{_ADVICE.get(scheme, _DEFAULT_ADVICE)}"
        )
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise MoeShrinkError(
            f"{where}: FP8 without a weight_block_size [rows, cols] (per-tensor or per-channel FP8) is not "
            f"supported, only block-wise FP8 as DeepSeek-V3 stores it; {_DEFAULT_ADVICE}"
        )
    unsupported = {
        "activation_scheme": ("dynamic",),
        "fmt": ("e4m3",),
        "scale_fmt": ("float",),
        "expert_dtype": ("fp8",),
    }
    for key, allowed in unsupported.items():
        value = config.get(key)
        if value is not None and str(value).lower() not in allowed:
            raise MoeShrinkError(
                f"{where}: block-FP8 with {key} {value!r} is not supported (only {allowed[0]!r}, as "
                f"DeepSeek-V3 and Qwen3 FP8 store it); {_DEFAULT_ADVICE}"
            )
    ignored = next((config[k] for k in IGNORE_KEYS if isinstance(config.get(k), list)), [])
    return BlockFP8Scheme(block=(block[0], block[1]), config=config, origin=origin, ignored=tuple(ignored))


def refuse_quantized(path: Path, command: str) -> None:
    """Refuse a quantized checkpoint in a command that only works on unquantized ones (one line)."""
    scheme = read_quantization(path)
    if scheme is not None:
        raise MoeShrinkError(
            f"{path} is {scheme.name}: '{command}' does not work on quantized checkpoints yet (it would write "
            "dequantized weights); 'moeshrink prune' does (kept experts copied bit-exact), or dequantize it first"
        )


def card_lines(quantization: dict[str, Any] | None) -> list[str]:
    """The model card's paragraph on a quantized input (none for an unquantized one)."""
    if not quantization:
        return []
    before, after = quantization.get("tensor_bytes_before"), quantization.get("tensor_bytes_after")
    sizes = f" Tensor bytes on disk: {before:,} before, {after:,} after." if before and after else ""
    return [
        f"Quantization: {quantization.get('scheme')} (weight_block_size {quantization.get('weight_block_size')}), "
        "kept as the input stores it: every tensor of a kept expert (float8 weights and their scales) is the "
        "input's bytes, unchanged, and the router rows are the input's rows; the bytes row above counts the "
        f"model dequantized as it was computed.{sizes} (`moeshrink apply` does not re-apply a plan to a "
        "quantized checkpoint yet: prune the original again with the same options.)",
        "",
    ]


__all__ = ["IGNORE_KEYS", "BlockFP8Scheme", "card_lines", "read_quantization", "refuse_quantized"]
