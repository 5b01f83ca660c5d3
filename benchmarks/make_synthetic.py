"""Write a random Mixtral- or Qwen3-MoE-shaped checkpoint of a chosen size, never holding it whole.

The decoder layer has a fixed shape and the size is reached with the number of layers, so larger
checkpoints differ only in depth (what the cost benchmark needs: time should grow with size, memory
should not). Tensor names and shapes come from transformers itself: the model is built on the meta
device and its layers' tensors are converted to the on-disk layout ``save_pretrained`` writes
(per-expert keys for both families). Tensors are drawn one at a time and written shard by shard, so
memory stays at one shard. The testbed tokenizer is copied beside the weights. With ``--fp8-block R C``
the decoder layers' linear weights are written as block-FP8 in DeepSeek-V3's layout (float8_e4m3fn,
a float32 ``weight_scale_inv`` per R x C tile, ``quant_method: fp8``), routers and the rest unquantized.

    python benchmarks/make_synthetic.py --size-gb 4 --out /tmp/synthetic-4g
    python benchmarks/make_synthetic.py --size-gb 10 --fp8-block 128 128 --out /tmp/synthetic-fp8-10g
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from moeshrink.errors import MoeShrinkError
from moeshrink.io.export import atomic_directory
from moeshrink.io.streaming import layer_of
from moeshrink.quant.fp8 import SCALE_SUFFIX, quantize, scale_shape
from moeshrink.testbed.fp8 import block_fp8_config, is_quantized_weight
from moeshrink.testbed.paths import tokenizer_dir

# One decoder layer of about 0.44 GB in bfloat16 (8 experts of 2048 -> 4096 -> 2048, GQA attention).
SHAPES: dict[str, dict] = {
    "mixtral": dict(
        hidden_size=2048,
        intermediate_size=4096,
        num_local_experts=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "qwen3_moe": dict(
        hidden_size=2048,
        moe_intermediate_size=1024,
        intermediate_size=4096,
        num_experts=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        norm_topk_prob=True,
    ),
}
COMMON: dict = dict(
    num_experts_per_tok=2,
    vocab_size=8192,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def synthetic_config(family: str, num_layers: int, dtype: torch.dtype):
    """The config of a ``family`` model with ``num_layers`` decoder layers of the fixed shape."""
    if family not in SHAPES:
        raise MoeShrinkError(f"no synthetic shape for {family}: choose one of {sorted(SHAPES)}")
    return AutoConfig.for_model(
        family,
        **SHAPES[family],
        **COMMON,
        num_hidden_layers=num_layers,
        dtype=str(dtype).removeprefix("torch."),
    )


def on_disk_shapes(family: str, num_layers: int, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the checkpoint holds, in order (non-layer tensors, then layer by layer), with
    the names and shapes ``save_pretrained`` would write."""
    config = synthetic_config(family, num_layers, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    groups: dict[int | None, dict] = {}
    for key, tensor in state.items():
        groups.setdefault(layer_of(key), {})[key] = tensor
    out = []
    for layer in [None, *range(num_layers)]:
        reverted = revert_weight_conversion(model, groups.get(layer, {}))
        out += [(k, tuple(v.shape)) for k, v in sorted(reverted.items())]
    return out


def stored_tensors(
    tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, fp8_block: tuple[int, int] | None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors as the file stores them: with ``fp8_block``, each quantized weight in float8 and
    its float32 scale right after it."""
    out = []
    for name, shape in tensors:
        if fp8_block is not None and is_quantized_weight(name, len(shape)):
            out.append((name, shape, torch.float8_e4m3fn))
            out.append((name + SCALE_SUFFIX, tuple(scale_shape(shape, fp8_block)), torch.float32))
        else:
            out.append((name, shape, dtype))
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def layers_for_size(
    family: str, size_bytes: float, dtype: torch.dtype, fp8_block: tuple[int, int] | None = None
) -> int:
    """How many decoder layers bring the checkpoint to about ``size_bytes``."""

    def total(num_layers: int, layers_only: bool = False) -> int:
        stored = stored_tensors(on_disk_shapes(family, num_layers, dtype), dtype, fp8_block)
        return sum(_nbytes(s, d) for k, s, d in stored if not layers_only or layer_of(k) is None)

    base = total(1, layers_only=True)
    per_layer = total(2) - total(1)
    return max(1, round((size_bytes - base) / per_layer))


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """Norm weights 1; routers with a wide spread (decisive routing); everything else N(0, 0.02)."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape, dtype=dtype)
    std = 1.0 if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")) else 0.02
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)


def _shards(
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int
) -> Iterator[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    group, size = [], 0
    for name, shape, dtype in tensors:
        nbytes = _nbytes(shape, dtype)
        if group and size + nbytes > shard_bytes:
            yield group
            group, size = [], 0
        group.append((name, shape, dtype))
        size += nbytes
    if group:
        yield group


def make_synthetic(
    out: str | Path,
    size_gb: float,
    family: str = "mixtral",
    dtype: str = "bfloat16",
    shard_gb: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
    fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Write the checkpoint to ``out`` (atomically) and return it."""
    torch_dtype = getattr(torch, dtype)
    num_layers = layers_for_size(family, size_gb * 1e9, torch_dtype, fp8_block)
    tensors = stored_tensors(on_disk_shapes(family, num_layers, torch_dtype), torch_dtype, fp8_block)
    total = sum(_nbytes(s, d) for _, s, d in tensors)
    free = shutil.disk_usage(Path(out).absolute().parent).free
    if free < total * 1.02:
        raise MoeShrinkError(
            f"{out}: a {total / 1e9:.1f} GB checkpoint does not fit in {free / 1e9:.1f} GB free; choose a smaller size"
        )
    shards = list(_shards(tensors, int(shard_gb * 1e9)))
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    with atomic_directory(out, overwrite) as tmp:
        for i, group in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            state = {}
            for key, shape, stored in group:
                if key.endswith(SCALE_SUFFIX):
                    continue  # written with its weight
                tensor = random_tensor(key, shape, torch_dtype, generator)
                if stored == torch.float8_e4m3fn:
                    state[key], state[key + SCALE_SUFFIX] = quantize(tensor, fp8_block)
                else:
                    state[key] = tensor
            save_file(state, tmp / name, metadata={"format": "pt"})
            del state
            weight_map.update(dict.fromkeys((k for k, _, _ in group), name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = synthetic_config(family, num_layers, torch_dtype)
        if fp8_block is not None:
            config.quantization_config = block_fp8_config(fp8_block)
        config.save_pretrained(tmp)
        for file in tokenizer_dir().iterdir():
            shutil.copy2(file, tmp / file.name)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, required=True, help="checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--fp8-block", type=int, nargs=2, metavar=("ROWS", "COLS"), help="write block-FP8 with these tiles"
    )
    args = parser.parse_args()
    fp8_block = tuple(args.fp8_block) if args.fp8_block else None
    path = make_synthetic(
        args.out, args.size_gb, args.family, args.dtype, args.shard_gb, args.seed, args.overwrite, fp8_block
    )
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path}: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
