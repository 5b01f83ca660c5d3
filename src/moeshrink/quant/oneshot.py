"""Prune, then quantize: hand the finished output to llm-compressor's ``oneshot`` (the ``quantize``
step, ``--quantize SCHEME``), on the calibration tokens the pruning used, and write one
compressed-tensors checkpoint in its place.

The step runs on the finished temporary output directory, before it is committed (the same hook the
verification uses), so the quantized checkpoint is written atomically like every other output and a
failure leaves nothing. The pruned checkpoint is loaded with plain transformers, its fused experts
linearized into one ``Linear`` per projection (llm-compressor's ``linearize_moe``), quantized, and
saved with the family's on-disk expert names (transformers' conversion mapping read backwards: Mixtral
keeps ``w1``/``w3``/``w2``). llm-compressor's ``load_context`` would linearize while loading, but with
transformers 5.17 that path walks every lazily aliased transformers module and needs torchvision.

Routers (the adapter's ``<moe block>.<router>``), ``lm_head`` and Qwen's ``shared_expert_gate`` are
left in the ignore list, as llm-compressor's MoE examples leave them. The llmcompressor package is the
``quantize`` extra; nothing here imports it before :func:`require_extra` has said it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter
from moeshrink.errors import MoeShrinkError
from moeshrink.extras import require_extra


@dataclass(frozen=True)
class Scheme:
    """A named quantization scheme (llm-compressor's preset) and how it is applied."""

    preset: str
    algorithm: str
    calibrates: bool  # needs calibration tokens (GPTQ, SmoothQuant)
    group_size: int | None  # weights quantized in groups along the input dimension
    what: str


SCHEMES: dict[str, Scheme] = {
    "FP8_DYNAMIC": Scheme(
        "FP8_DYNAMIC",
        "round to nearest (QuantizationModifier)",
        False,
        None,
        "float8 (e4m3) weights, one scale per output channel; activations quantized per token at run time",
    ),
    "W8A8": Scheme(
        "W8A8",
        "SmoothQuant (strength 0.8) then GPTQ",
        True,
        None,
        "int8 weights, one scale per output channel; int8 activations per token at run time",
    ),
    "W4A16": Scheme(
        "W4A16",
        "GPTQ",
        True,
        128,
        "int4 weights in groups of 128 along the input, packed into int32; 16-bit activations",
    ),
}
SMOOTHING_STRENGTH = 0.8  # llm-compressor's W8A8 examples

# llm-compressor's MoE examples leave these out (plus each family's router, from its adapter).
ALWAYS_IGNORED = ("lm_head", r"re:.*mlp\.shared_expert_gate$")


def check_scheme(name: str) -> Scheme:
    """The scheme called ``name`` (case-insensitive), or a one-line error listing the supported ones."""
    scheme = SCHEMES.get(str(name).upper())
    if scheme is None:
        raise MoeShrinkError(
            f"--quantize {name}: not a scheme moeshrink hands to llm-compressor; supported: {', '.join(SCHEMES)}"
        )
    return scheme


def ignore_list(adapter: FamilyAdapter, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Modules left unquantized: ``lm_head``, the family's routers, Qwen's shared-expert gate, ``extra``."""
    router = rf"re:.*{re.escape(adapter.moe_block)}\.{re.escape(adapter.router)}$"
    return list(dict.fromkeys([ALWAYS_IGNORED[0], router, *ALWAYS_IGNORED[1:], *extra]))


def _ignored(name: str, ignore: list[str]) -> bool:
    """Whether module ``name`` matches an entry of ``ignore`` (a name's suffix, or ``re:`` a regex)."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):
                return True
        elif name == entry or name.endswith("." + entry):
            return True
    return False


def check_quantize(
    name: str, adapter: FamilyAdapter, skeleton: nn.Module, extra_ignore: list[str] | tuple[str, ...] = ()
) -> tuple[Scheme, list[str]]:
    """Everything a quantize step needs, checked before any work: the scheme, every quantized weight's
    input dimension divisible by the scheme's group size (on the weightless ``skeleton``; fused experts
    count by their last dimension), the extra installed. Returns the scheme and ignore list."""
    scheme = check_scheme(name)
    ignore = ignore_list(adapter, extra_ignore)
    if scheme.group_size:
        for module_name, module in skeleton.named_modules():
            if _ignored(module_name, ignore):
                continue
            if isinstance(module, nn.Linear):
                widths = {module_name: module.in_features}
            else:
                widths = {
                    f"{module_name}.{p}": t.shape[-1]
                    for p, t in module.named_parameters(recurse=False)
                    if t.dim() == 3 and "experts" in module_name
                }
            for where, width in widths.items():
                if width % scheme.group_size:
                    raise MoeShrinkError(
                        f"--quantize {scheme.preset} quantizes weights in groups of {scheme.group_size} along the "
                        f"input, but {where} has {width} inputs: choose FP8_DYNAMIC or W8A8 (one scale per channel), "
                        "or add the module to the quantize step's ignore list"
                    )
    require_extra("llmcompressor", f"--quantize {scheme.preset} (prune, then quantize with llm-compressor)")
    return scheme, ignore


def library_versions() -> dict[str, str]:
    """The versions of the libraries that quantized (recorded in the plan and card)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def _recipe(scheme: Scheme, ignore: list[str]) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if scheme.preset == "FP8_DYNAMIC":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    gptq = GPTQModifier(targets="Linear", scheme=scheme.preset, ignore=ignore)
    if scheme.preset == "W8A8":
        return [SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH), gptq]
    return [gptq]


def _save_mapping(model_type: str) -> list:
    """transformers' conversion mapping for ``model_type`` as renamings only, with each fused expert
    tensor's per-expert checkpoint names mapped to the linearized projections, so that saving writes
    the family's on-disk names (Mixtral: ``block_sparse_moe.experts.N.w1``)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    out = []
    for m in get_checkpoint_conversion_mapping(model_type) or []:
        if isinstance(m, WeightRenaming):
            out.append(m)
            continue
        if not isinstance(m, WeightConverter) or len(m.target_patterns) != 1:
            continue
        target = m.target_patterns[0]
        linear = (
            ["gate_proj", "up_proj"]
            if target.endswith("gate_up_proj")
            else ["down_proj"]
            if target.endswith("down_proj")
            else []
        )
        names = [re.search(r"experts\.\*\.(\w+)\.weight$", s) for s in m.source_patterns]
        if len(names) != len(linear) or not all(names):
            continue
        for found, proj in zip(names, linear, strict=True):
            out.append(WeightRenaming(rf"\.experts\.(\d+)\.{found.group(1)}\.", rf".experts.\1.{proj}."))
    return out


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.name in WEIGHT_FILES or re.fullmatch(r"model-.*\.safetensors", p.name)
    )


def quantize_output(
    directory: Path,
    scheme: Scheme,
    ignore: list[str],
    input_ids: torch.Tensor | None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the checkpoint in ``directory`` in place with llm-compressor (``scheme``, ``ignore``;
    GPTQ and SmoothQuant calibrate on ``input_ids``, the pruning's tokens). Its weight files and
    config.json are replaced by the compressed-tensors ones, llm-compressor's ``recipe.yaml`` is added.
    llm-compressor places the model itself (a GPU when there is one). Returns what the plan records."""
    require_extra("llmcompressor", f"--quantize {scheme.preset}")
    # llm-compressor logs to stdout from its import on ("No accelerator available!"), and its GPTQ needs
    # its logger configured (the METRIC level): errors only, unless the user's environment says otherwise
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.conversion_mappings import set_save_conversion_mapping
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if progress:
        print(
            f"quantizing with llm-compressor: {scheme.preset} ({scheme.algorithm})"
            + (
                f" on {input_ids.shape[0]} x {input_ids.shape[1]} calibration tokens"
                if scheme.calibrates
                else ""
            ),
            file=sys.stderr,
        )
    if scheme.calibrates and input_ids is None:
        raise AssertionError("check_job asks for calibration text when the scheme calibrates")
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    linearize_moe(model)
    set_save_conversion_mapping(model, _save_mapping(model_type))
    recipe = _recipe(scheme, ignore)
    kwargs: dict[str, Any] = {}
    if scheme.calibrates:
        ids = input_ids.tolist()
        kwargs = dict(
            dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
            num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]),
            shuffle_calibration_samples=False,
        )
    oneshot(model=model, recipe=recipe, **kwargs)
    quantized = directory / ".quantized"
    model.save_pretrained(quantized, save_compressed=True)
    del model
    for old in _weight_files(directory):
        old.unlink()
    for new in [*_weight_files(quantized), quantized / "config.json", quantized / "recipe.yaml"]:
        if new.is_file():
            shutil.move(str(new), directory / new.name)
    shutil.rmtree(quantized)
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    return {
        "scheme": scheme.preset,
        "algorithm": scheme.algorithm,
        "what": scheme.what,
        "tool": "llmcompressor.oneshot",
        "recipe": "recipe.yaml",
        "format": config.get("format"),
        "ignore": ignore,
        "ignored_modules": config.get("ignore", []),
        "calibration": "the pruning's calibration tokens" if scheme.calibrates else None,
        "weight_bytes": sum(p.stat().st_size for p in _weight_files(directory) if p.suffix == ".safetensors"),
        "versions": library_versions(),
        "seconds": round(time.perf_counter() - start, 2),
    }


def card_lines(record: dict[str, Any] | None, bytes_before: int | None = None) -> list[str]:
    """The model card's lines on the quantize step (``record``: the plan's ``quantization``)."""
    if not record:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
    size = f"{record['weight_bytes']:,} bytes of weight files"
    if bytes_before:
        size += f" ({record['weight_bytes'] / bytes_before:.1%} of the pruned model's {bytes_before:,})"
    lines = [
        "## Quantization (after pruning)",
        "",
        f"Then quantized with llm-compressor's `oneshot` ({versions}): **{record['scheme']}**, "
        f"{record['algorithm']}: {record['what']}"
        + (", calibrated on the same tokens as the pruning" if record.get("calibration") else "")
        + f". compressed-tensors format `{record.get('format')}`; {size}. Left unquantized (ignore list): "
        + ", ".join(f"`{i}`" for i in record.get("ignore", []))
        + f". The recipe is in [`{record.get('recipe')}`]({record.get('recipe')}). transformers loads it with the "
        "compressed-tensors package installed; `moeshrink.io.checkpoint.load_model` dequantizes it without.",
        "",
    ]
    check = record.get("verification")
    if check:
        rows = "; ".join(f"{name}: {c['status']} ({c['detail']})" for name, c in check.items())
        lines += [
            "The verification table below checks the pruned export against the model in memory before it was "
            f"quantized; the quantized checkpoint itself, in a fresh process: {rows}.",
            "",
        ]
    return lines


__all__ = [
    "SCHEMES",
    "Scheme",
    "card_lines",
    "check_quantize",
    "check_scheme",
    "ignore_list",
    "library_versions",
    "quantize_output",
]
