"""Quantized checkpoints in: which scheme a checkpoint uses, and whether moeshrink can work on it.

Read from the checkpoint's files alone, before any weight is read (:func:`read_quantization`):
``quantization_config`` in ``config.json`` (or ``compression_config``, compressed-tensors' older key),
else a ``quantization_config.json`` beside it; the stand-alone files other tools write
(``quantize_config.json``: AutoGPTQ, ``quant_config.json``: AutoAWQ, ``hf_quant_config.json``:
ModelOpt) are recognised too, so that their checkpoints are refused by name.

Supported: block-wise FP8 as DeepSeek-V3 and the Qwen3 FP8 releases store it
(:class:`BlockFP8Scheme`, :mod:`moeshrink.quant.fp8`), and compressed-tensors as llm-compressor writes
it in the ``float-quantized`` (FP8), ``int-quantized`` (INT8 W8A8), ``naive-quantized`` and
``pack-quantized`` (INT4/INT8 packed into int32, W4A16) formats (:class:`CompressedTensorsScheme`,
:mod:`moeshrink.quant.ctensors`). Every other scheme is refused in one line naming it and what to do.
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
    "compressed-tensors": "decompress it first (compressed-tensors' ModelCompressor, or transformers with "
    "CompressedTensorsConfig(run_compressed=False) then save_pretrained) or prune the dense checkpoint it was "
    "made from",
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


# compressed-tensors formats whose tensors moeshrink reads (compressed_tensors.config.CompressionFormat)
CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
CT_STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class WeightGroup:
    """One ``config_groups`` entry of a compressed-tensors config: which modules (``targets``: names,
    ``re:`` regexes or class names such as ``Linear``) hold weights in which format and layout."""

    targets: tuple[str, ...]
    format: str
    type: str  # "float" or "int"
    num_bits: int
    strategy: str  # tensor, channel, group or block
    symmetric: bool = True
    group_size: int | None = None
    block: tuple[int, int] | None = None
    actorder: str | None = None

    def describe(self) -> dict[str, Any]:
        """What the plan records of the group."""
        out: dict[str, Any] = {"format": self.format, "weights": f"{self.type}{self.num_bits}"}
        out["strategy"] = self.strategy
        if self.group_size:
            out["group_size"] = self.group_size
        if self.block:
            out["block_structure"] = list(self.block)
        if not self.symmetric:
            out["symmetric"] = False
        return out


@dataclass(frozen=True)
class CompressedTensorsScheme:
    """compressed-tensors (``quant_method: compressed-tensors``), as llm-compressor writes it: per
    quantized Linear ``X``, ``X.weight`` (float8 or int8) or ``X.weight_packed`` (int32) with
    ``X.weight_shape``, ``X.weight_scale``, ``X.weight_zero_point`` when asymmetric; ``ignore`` lists
    the modules left unquantized (routers, LM head)."""

    groups: dict[str, WeightGroup]
    config: dict[str, Any]
    origin: str = "config.json"
    ignored: tuple[str, ...] = field(default_factory=tuple)

    name = "compressed-tensors"

    def describe(self) -> dict[str, Any]:
        """What the plan records of the scheme."""
        return {
            "scheme": self.name,
            "quant_method": self.config.get("quant_method"),
            "format": self.config.get("format"),
            "groups": {name: g.describe() for name, g in self.groups.items()},
            "config_file": self.origin,
        }


QuantScheme = BlockFP8Scheme | CompressedTensorsScheme


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


def _ct_refuse(path: Path, where: str, what: str) -> MoeShrinkError:
    return MoeShrinkError(
        f"{path} is a compressed-tensors checkpoint with {what} ({where}): moeshrink prunes compressed-tensors "
        f"{', '.join(CT_FORMATS)} weights (FP8, INT8, packed INT4/INT8) only; {_ADVICE['compressed-tensors']}"
    )


def weight_group(path: Path, where: str, name: str, group: Any, default_format: Any) -> WeightGroup:
    """One config group, checked: a supported format, weights of a supported type and layout."""
    if not isinstance(group, dict):
        raise _ct_refuse(path, where, f"config group {name!r} that is not an object")
    fmt = group.get("format") or default_format
    if fmt not in CT_FORMATS:
        raise _ct_refuse(path, where, f"format {fmt!r} (config group {name!r})")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _ct_refuse(path, where, f"config group {name!r} without weight quantization")
    kind, bits = weights.get("type"), weights.get("num_bits")
    strategy, actorder = weights.get("strategy"), weights.get("actorder")
    packed = fmt == "pack-quantized"
    if not (
        (kind == "float" and bits == 8 and not packed)
        or (kind == "int" and bits == 8 and not packed and fmt != "float-quantized")
        or (kind == "int" and isinstance(bits, int) and 1 <= bits <= 8 and packed)
    ):
        raise _ct_refuse(path, where, f"{kind}{bits} weights in format {fmt!r} (config group {name!r})")
    if packed and 32 % bits:  # compressed-tensors 0.19 packs these densely across int32s, 0.17 did not
        raise _ct_refuse(
            path, where, f"{bits}-bit packed weights (their int32 packing changed in compressed-tensors 0.19)"
        )
    if (
        strategy not in CT_STRATEGIES
        or weights.get("dynamic")
        or actorder not in (None, "group", "weight", "static")
    ):
        raise _ct_refuse(path, where, f"weight strategy {strategy!r} (config group {name!r})")
    activations = group.get("input_activations")
    if isinstance(activations, dict) and (activations.get("num_bits") or 8) < 8:
        raise _ct_refuse(
            path, where, f"{activations.get('num_bits')}-bit activations (config group {name!r})"
        )
    size, block = weights.get("group_size"), weights.get("block_structure")
    if strategy == "group" and not (isinstance(size, int) and size > 0):
        raise _ct_refuse(path, where, f"group strategy without a group_size (config group {name!r})")
    if strategy == "block" and not (
        isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise _ct_refuse(path, where, f"block strategy without a block_structure (config group {name!r})")
    targets = group.get("targets")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _ct_refuse(path, where, f"config group {name!r} without a list of targets")
    return WeightGroup(
        targets=tuple(targets),
        format=str(fmt),
        type=str(kind),
        num_bits=int(bits),
        strategy=str(strategy),
        symmetric=bool(weights.get("symmetric", True)),
        group_size=int(size) if strategy == "group" else None,
        block=(block[0], block[1]) if strategy == "block" else None,
        actorder=actorder,
    )


def _compressed_tensors(
    path: Path, config: dict[str, Any], origin: str, where: str
) -> CompressedTensorsScheme:
    """A compressed-tensors config, checked: compressed weights of a supported format in every group; no
    sparsity compressor or transform."""
    fmt = config.get("format")
    if fmt not in (*CT_FORMATS, "mixed-precision", None):
        raise _ct_refuse(path, where, f"format {fmt!r}")
    status = config.get("quantization_status")
    if status not in (None, "compressed"):
        raise _ct_refuse(path, where, f"quantization_status {status!r} (weights not stored compressed)")
    sparsity = config.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity and sparsity.get("format") not in (None, "dense"):
        raise _ct_refuse(path, where, f"the sparsity compressor {sparsity.get('format')!r}")
    if config.get("transform_config"):
        raise _ct_refuse(path, where, "a transform_config (rotations)")
    groups = config.get("config_groups")
    if not (isinstance(groups, dict) and groups):
        raise _ct_refuse(path, where, "no config_groups")
    parsed = {name: weight_group(path, where, name, g, fmt) for name, g in groups.items()}
    ignored = config.get("ignore") if isinstance(config.get("ignore"), list) else []
    return CompressedTensorsScheme(groups=parsed, config=config, origin=origin, ignored=tuple(ignored))


def read_quantization(path: Path) -> QuantScheme | None:
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
    if method in ("compressed-tensors", "compressed_tensors"):
        return _compressed_tensors(path, config, origin, where)
    if method != "fp8":
        scheme = {"compressed_tensors": "compressed-tensors"}.get(method, method)
        variant = config.get("quant_algo") or (
            config.get("format") if scheme == "compressed-tensors" else None
        )
        detail = f" ({variant})" if variant else ""
        raise MoeShrinkError(
            f"{path} is a {scheme}{detail} quantized checkpoint ({where}): moeshrink prunes block-FP8 "
            f"(quant_method fp8 with weight_block_size), compressed-tensors (FP8, INT8, packed INT4) and "
            f"unquantized checkpoints only; "
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
    if quantization.get("weight_block_size"):
        detail = f"weight_block_size {quantization.get('weight_block_size')}"
    else:
        detail = ", ".join(
            f"{name}: {g.get('format')} {g.get('weights')} {g.get('strategy')}"
            for name, g in (quantization.get("groups") or {}).items()
        )
    requantized = quantization.get("requantization") or {}
    if requantized.get("tensors"):
        kept = requantized.get("kept_scales", 0)
        how = (
            f"{requantized['tensors']:,} tensors the job changed (merged, re-fitted or sparsified experts) were "
            f"dequantized, computed and re-quantized in the same scheme and layout ({kept:,} of them zeros only: "
            "the input's scales kept, exact); relative Frobenius error of the written weights against the "
            f"computed ones: mean {requantized['mean_relative_error']:.4f}, largest "
            f"{requantized['max_relative_error']:.4f} (per layer in the plan). Every other tensor (quantized "
            "weights and their scales) is the input's bytes, unchanged; the router rows are the plan's rows of the "
            "input's router (the fitted rows where recovery re-fitted them); "
        )
    else:
        how = (
            "kept as the input stores it: every tensor of a kept expert (quantized weights and their scales) is "
            "the input's bytes, unchanged, and the router rows are the input's rows; "
        )
    return [
        f"Quantization: {quantization.get('scheme')} ({detail}), {how}the bytes row above counts the "
        f"model dequantized as it was computed.{sizes} (`moeshrink apply` does not re-apply a plan to a "
        "quantized checkpoint yet: prune the original again with the same options.)",
        "",
    ]


__all__ = [
    "CT_FORMATS",
    "IGNORE_KEYS",
    "BlockFP8Scheme",
    "CompressedTensorsScheme",
    "QuantScheme",
    "WeightGroup",
    "weight_group",
    "card_lines",
    "read_quantization",
    "refuse_quantized",
]
