"""What an MoE model holds: family, layers, experts, top-k, parameters and bytes (``moeshrink inspect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moeshrink.arch import FamilyAdapter
from moeshrink.io.checkpoint import (
    check_safetensors_file,
    load_config,
    resize_per_layer,
    resolve_checkpoint,
    weight_files,
)
from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY


@dataclass
class ModelInfo:
    family: str
    layers: int
    moe_layers: list[int]
    experts_per_layer: list[int]
    top_k: int
    expert_intermediate_size: int
    hidden_size: int
    shared_expert_parameters: int
    parameters: int
    expert_parameters: int
    router_parameters: int
    dtype: str
    bytes: int
    expert_bytes: int
    file_bytes: int | None = None
    path: str | None = None
    serving: str | None = None  # what serving it needs, when that is more than the family's own support

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def experts_text(self) -> str:
        """``8``, or ``3-5 (per layer: [4, 3, 5])`` when the layers differ."""
        counts = self.experts_per_layer
        return (
            str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} (per layer: {counts})"
        )

    def to_text(self) -> str:
        experts = sorted(set(self.experts_per_layer))
        per_layer = str(experts[0]) if len(experts) == 1 else f"{min(experts)}..{max(experts)} (varies)"
        dense = self.layers - len(self.moe_layers)
        rows = [
            ("model", self.path or "(in memory)"),
            ("family", self.family),
            ("decoder layers", f"{self.layers} ({len(self.moe_layers)} MoE, {dense} dense)"),
            ("experts per MoE layer", per_layer),
            ("active experts (top-k)", str(self.top_k)),
            ("expert size", f"hidden {self.hidden_size}, intermediate {self.expert_intermediate_size}"),
            (
                "shared experts",
                f"yes, {_count(self.shared_expert_parameters)} parameters"
                if self.shared_expert_parameters
                else "no",
            ),
            ("parameters", _count(self.parameters)),
            (
                "  in routed experts",
                f"{_count(self.expert_parameters)} ({self.expert_parameters / self.parameters:.1%})",
            ),
            ("  in routers", _count(self.router_parameters)),
            ("bytes (" + self.dtype + ")", _bytes(self.bytes)),
            ("  in routed experts", _bytes(self.expert_bytes)),
        ]
        if self.file_bytes is not None:
            rows.append(("on disk", _bytes(self.file_bytes)))
        if self.serving is not None:
            rows.append(("serving", self.serving))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe_model(model: nn.Module, adapter: FamilyAdapter, dtype: torch.dtype | None = None) -> ModelInfo:
    """Count what ``model`` holds (works on the meta device, so nothing needs to be loaded)."""
    layers = adapter.moe_layers(model)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    experts = sum(layer.expert_parameter_count() for layer in layers)
    routers = sum(t.numel() for layer in layers for t in layer.router_tensors().values())
    shared = sum(p.numel() for layer in layers for m in layer.shared_modules for p in m.parameters())
    dtype = dtype or params[0].dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return ModelInfo(
        family=adapter.model_type,
        layers=len(adapter.decoder_layers(model)),
        moe_layers=[layer.index for layer in layers],
        experts_per_layer=[layer.num_experts for layer in layers],
        top_k=layers[0].top_k,
        expert_intermediate_size=layers[0].intermediate_size,
        hidden_size=layers[0].hidden_size,
        shared_expert_parameters=shared,
        parameters=total,
        expert_parameters=experts,
        router_parameters=routers,
        dtype=str(dtype).removeprefix("torch."),
        bytes=total * itemsize,
        expert_bytes=experts * itemsize,
    )


def meta_model(config, adapter: FamilyAdapter) -> nn.Module:
    """The model of ``config`` on the meta device: every shape, no memory, nothing loaded."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    resize_per_layer(model, adapter, config)
    return model


def inspect_model(path: str | Path, revision: str | None = None) -> ModelInfo:
    """Describe a checkpoint (a directory, or a Hub id at ``revision``) from its config alone: the
    model is built on the meta device."""
    path = resolve_checkpoint(path, revision)
    config, adapter = load_config(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    info = describe_model(meta_model(config, adapter), adapter, dtype)
    info.path = str(path)
    files = weight_files(Path(path))
    for file in files:  # a truncated download is reported, not shown as a normal checkpoint
        check_safetensors_file(file)
    info.file_bytes = sum(f.stat().st_size for f in files)
    if getattr(config, PER_LAYER_KEY, None) or getattr(config, TOP_K_PER_LAYER_KEY, None):
        info.serving = (
            "per-layer expert counts or top-k: vLLM serves it with moeshrink's plugin (pip install moeshrink "
            "in vLLM's environment); load it in transformers with moeshrink.io.checkpoint.load_model"
        )
    return info
