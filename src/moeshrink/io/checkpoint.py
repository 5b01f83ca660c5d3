"""Open a Hugging Face MoE checkpoint safely: validate files before loading, weights after."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from moeshrink.arch import FamilyAdapter, get_adapter
from moeshrink.errors import MoeShrinkError
from moeshrink.io.hub import is_hub_id, resolve_hub_model
from moeshrink.plan import LayerPlan
from moeshrink.quant import read_quantization
from moeshrink.surgery import apply_layer_plan, set_top_k
from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY
from moeshrink.surgery.router_transfer import (
    LEGACY_TRANSFER_FILENAME,
    TRANSFER_FILENAME,
    install_router_transfer,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer saved in ``path`` has a chat template (its own file, or in its config)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except json.JSONDecodeError:
        return False


def resolve_checkpoint(path: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory holding ``config.json``: a local directory, or a Hugging Face Hub id
    (``org/name``, at ``revision``) resolved through the Hub cache (:mod:`moeshrink.io.hub`)."""
    local = Path(path).expanduser()
    if not local.is_dir() and is_hub_id(path):
        local = resolve_hub_model(str(path), revision)
    elif revision is not None:
        raise MoeShrinkError(
            f"--revision {revision} names a revision of a Hub model (org/name); {path} is a local path"
        )
    path = local
    if not path.is_dir():
        raise MoeShrinkError(f"model directory not found: {path} (a local directory, or org/name on the Hub)")
    if not (path / "config.json").is_file():
        raise MoeShrinkError(f"{path} has no config.json: point at a Hugging Face checkpoint directory")
    return path


def load_config(path: str | Path) -> tuple[PretrainedConfig, FamilyAdapter]:
    """The config and its family adapter, without touching the weights."""
    path = resolve_checkpoint(path)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise MoeShrinkError(
            f"{path / 'config.json'} is not valid JSON ({reason}): re-download the checkpoint"
        ) from e
    adapter = get_adapter(raw)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, TypeError) as e:
        raise MoeShrinkError(
            f"{path / 'config.json'}: transformers refuses it ({' '.join(str(e).split())}): fix it or re-download"
        ) from e
    experts, top_k = adapter.num_experts(config), getattr(config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > experts:
        raise MoeShrinkError(
            f"{path / 'config.json'}: num_experts_per_tok {top_k} is more than the {experts} experts per layer: "
            "the config is inconsistent; fix it or re-download the checkpoint"
        )
    return config, adapter


def read_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of a ``model.safetensors.index.json``, or a one-line error."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise MoeShrinkError(f"{index}: not a readable index ({e}): re-download the checkpoint") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MoeShrinkError(
            f"{index}: no 'weight_map' of tensor names to shard files: re-download the checkpoint"
        )
    return weight_map


def weight_files(path: Path) -> list[Path]:
    """The safetensors files the checkpoint consists of, per its index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            example = next(k for k, v in weight_map.items() if v == missing[0])
            raise MoeShrinkError(
                f"{path}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                f"(holds e.g. {example}); {len(missing)} of {len(files)} shards absent: re-download the checkpoint"
            )
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")):
        raise MoeShrinkError(f"{path}: only PyTorch .bin weights found; convert them to safetensors first")
    raise MoeShrinkError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def find_extra(directory: Path, name: str, legacy: str) -> Path | None:
    """An extras file of a checkpoint folder where moeshrink writes it now, or where it wrote it
    before (top level, which vLLM refuses: re-export, or move it into the subfolder, to serve it)."""
    for candidate in (directory / name, directory / legacy):
        if candidate.is_file():
            return candidate
    return None


def check_safetensors_file(file: Path) -> None:
    """Header parses and the file is as long as its header says (catches truncated downloads)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError) as e:
        raise MoeShrinkError(f"{file}: not a readable safetensors file ({e}); re-download it") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise MoeShrinkError(
            f"{file}: truncated ({size} bytes, its header needs {8 + header_len + end}); re-download it"
        )


def checkpoint_fingerprint(path: Path) -> str:
    """Hash of config.json and the weight files' names and sizes: cheap, and tells checkpoints apart
    (but not two fine-tunes of one model: :func:`content_fingerprint` does)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


CONTENT_SAMPLES, CONTENT_SAMPLE_BYTES = 16, 1 << 16


def content_fingerprint(path: Path) -> str:
    """Hash of every weight file's header and of 16 windows of 64 KiB spread over its tensor data: two
    checkpoints of the same shapes but different weights (fine-tunes of one model) differ here, at the
    cost of reading about 1 MiB per file."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        size = file.stat().st_size
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(file.name.encode() + f.read(header_len))
            start, span = 8 + header_len, max(size - 8 - header_len - CONTENT_SAMPLE_BYTES, 0)
            for i in range(CONTENT_SAMPLES):
                f.seek(start + span * i // max(CONTENT_SAMPLES - 1, 1))
                digest.update(f.read(CONTENT_SAMPLE_BYTES))
    return digest.hexdigest()


def check_finite(model: nn.Module) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MoeShrinkError(
                f"weight {name} contains NaN or inf: the checkpoint is corrupt; re-download it"
            )


def resize_per_layer(model: nn.Module, adapter: FamilyAdapter, config) -> None:
    """Shrink each MoE layer to its count in ``moeshrink_experts_per_layer`` (no-op without the field)."""
    counts = getattr(config, PER_LAYER_KEY, None)
    if not counts:
        return
    for layer in adapter.moe_layers(model):
        if layer.index >= len(counts) or counts[layer.index] is None:
            raise MoeShrinkError(f"{PER_LAYER_KEY} in config.json has no count for MoE layer {layer.index}")
        keep = list(range(counts[layer.index]))
        apply_layer_plan(layer, LayerPlan.keep(layer.index, layer.num_experts, keep))


def resolve_dtype(config: PretrainedConfig, dtype: str | torch.dtype) -> torch.dtype:
    """``auto`` -> the checkpoint's dtype from its config (float32 when it names none)."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_moe_layers(model: nn.Module, adapter: FamilyAdapter, path: Path) -> None:
    """The model has MoE layers, and its experts are laid out as the adapter expects."""
    layers = adapter.moe_layers(model)
    if not layers:
        raise MoeShrinkError(f"{path}: no MoE layers found in this {adapter.model_type} model")
    adapter.check_weights_layout(layers[0])


def _load_per_layer(path: Path, config, adapter: FamilyAdapter, dtype, experts: str | None) -> nn.Module:
    """Load a checkpoint whose MoE layers keep different numbers of experts (config field
    ``moeshrink_experts_per_layer``): build the model, shrink each layer to its count with the
    shared surgery, then load the fused tensors strictly (only tied weights may be absent)."""
    model = AutoModelForCausalLM.from_config(
        config, dtype=resolve_dtype(config, dtype), experts_implementation=experts
    )
    resize_per_layer(model, adapter, config)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise MoeShrinkError(
            f"{path}: weights do not match {PER_LAYER_KEY} (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); re-export the checkpoint"
        )
    model.tie_weights()
    return model


def _from_pretrained_strict(path: Path, dtype, experts: str | None) -> nn.Module:
    """``from_pretrained``, refusing what it would otherwise only log: a tensor the model needs that
    the files lack (transformers fills it with random values) or one of the wrong shape."""
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, experts_implementation=experts, output_loading_info=True
        )
    except (RuntimeError, ValueError) as e:
        if not any(word in str(e) for word in ("size mismatch", "shape", "mismatched_sizes")):
            raise
        raise MoeShrinkError(
            f"{path}: a tensor has the wrong shape for its config.json (transformers' load report above names "
            "it): the config and weights disagree; re-download the checkpoint"
        ) from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise MoeShrinkError(
            f"{path}: the checkpoint has no tensor for {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": transformers would fill it with random values; re-download the checkpoint"
        )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        name = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
        raise MoeShrinkError(f"{path}: tensor {name} has the wrong shape for its config; re-download it")
    # transformers has already dropped the names its model class expects to ignore (e.g. MTP layers)
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise MoeShrinkError(
            f"{path}: the checkpoint has a tensor its config.json has no place for, {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ": transformers would drop it silently; the config and weights disagree (e.g. the expert count): "
            "fix config.json or re-download the checkpoint"
        )
    return model


@dataclass
class LoadedModel:
    """A model with what belongs to it."""

    model: nn.Module
    adapter: FamilyAdapter
    path: Path
    tokenizer: object | None


def load_tokenizer(path: Path):
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path)


def load_model(
    path: str | Path,
    dtype: str = "auto",
    tokenizer: object | None = None,
    device: str = "cpu",
    exact_router: bool = True,
) -> LoadedModel:
    """Validate the files, load the model on CPU in eval mode, and check its weights are finite.

    When the work happens on the CPU the experts run through transformers' eager loop, which there
    is many times faster than the default grouped-matmul kernels (30x on the testbed). A checkpoint
    saved with its exact router transfer routes by it unless ``exact_router`` is False (then by the
    folded rows in its standard weights, as transformers and vLLM do)."""
    path = resolve_checkpoint(path)
    if read_quantization(path) is not None:  # block-FP8, compressed-tensors (others are refused there)
        from moeshrink.quant.source import load_quantized_model  # it builds on this module

        return load_quantized_model(path, dtype, tokenizer)
    _, adapter = load_config(path)
    for file in weight_files(path):
        check_safetensors_file(file)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    experts = "eager" if torch.device(device).type == "cpu" else None
    config = AutoConfig.from_pretrained(path)
    if getattr(config, PER_LAYER_KEY, None):
        model = _load_per_layer(path, config, adapter, torch_dtype, experts)
    else:
        model = _from_pretrained_strict(path, torch_dtype, experts)
    model.eval()
    check_finite(model)
    check_moe_layers(model, adapter, path)
    layers = adapter.moe_layers(model)
    per_layer_top_k = getattr(config, TOP_K_PER_LAYER_KEY, None)
    if per_layer_top_k:  # routers were built with the largest top-k
        for layer in layers:
            set_top_k(layer, int(per_layer_top_k[layer.index]))
    transfer = find_extra(path, TRANSFER_FILENAME, LEGACY_TRANSFER_FILENAME)
    if exact_router and transfer is not None:  # an EEP export's exact router transfer (see router_transfer)
        install_router_transfer(model, adapter, load_file(transfer))
    return LoadedModel(model=model, adapter=adapter, path=path, tokenizer=tokenizer or load_tokenizer(path))
