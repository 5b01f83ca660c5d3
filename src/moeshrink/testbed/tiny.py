"""Tiny random MoE checkpoints of every supported family, written as real Hugging Face directories.

Used by the tests and by the demo before a trained testbed exists. Router weights are drawn with a
larger spread than transformers' default init so that routing is decisive (no near-ties), and
DeepSeek's correction bias is random so that its slicing is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from moeshrink.arch import ADAPTERS

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

# DeepSeek: 8 routed experts in 2 groups, one leading dense layer, a shared expert, small MLA attention.
_DEEPSEEK: dict[str, Any] = dict(
    n_routed_experts=8,
    n_group=2,
    first_k_dense_replace=1,
    moe_intermediate_size=48,
    n_shared_experts=1,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)

FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8),
    "qwen2_moe": dict(
        num_experts=8, moe_intermediate_size=48, shared_expert_intermediate_size=64, norm_topk_prob=False
    ),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16),
    "olmoe": dict(num_experts=8, norm_topk_prob=False),
    "deepseek_v2": dict(
        **_DEEPSEEK, topk_group=1, topk_method="group_limited_greedy", routed_scaling_factor=1.0
    ),
    "deepseek_v3": dict(**_DEEPSEEK, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    # as Phi-3.5-MoE: biased attention projections and LM head (vLLM's PhiMoE always has them)
    "phimoe": dict(num_local_experts=8, attention_bias=True, lm_head_bias=True),
    "granitemoe": dict(num_local_experts=8),
    "gpt_oss": dict(num_local_experts=8, head_dim=16, sliding_window=8, layer_types=None),
}

# The architecture name a family's published checkpoints carry where it differs from transformers'
# class name (which ``save_pretrained`` writes): engines such as vLLM look models up by it.
PUBLISHED_ARCHITECTURE: dict[str, str] = {"phimoe": "PhiMoEForCausalLM"}

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Experts in a mixture are chosen by a router. "
    "def prune(model, keep):\n    return model\n"
    "In the beginning was the word, and the word was with the model. To be, or not to be: that is the question. "
)


def tiny_config(family: str, **overrides: Any):
    """A small config of ``family`` (3 decoder layers, 8 routed experts, top-2)."""
    if family not in FAMILY_CONFIG:
        raise ValueError(f"no tiny config for {family}; families: {sorted(FAMILY_CONFIG)}")
    kwargs = {**COMMON, **FAMILY_CONFIG[family], **overrides}
    if family == "gpt_oss" and kwargs.get("layer_types") is None:
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 400, text: str = TINY_TEXT
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``text`` (instant), saved as a Hugging Face tokenizer in ``out_dir``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out_dir)
    return fast


@torch.no_grad()
def randomize_routers(model, family: str, seed: int = 0, scale: float = 1.0) -> None:
    """Give routers (and DeepSeek's correction bias, GPT-OSS's router bias) decisive random values."""
    generator = torch.Generator().manual_seed(seed)
    for layer in ADAPTERS[family].moe_layers(model):
        for name, tensor in layer.router_tensors().items():
            std = scale if name == "weight" else 0.1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def build_tiny_model(
    family: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    """Write a random tiny ``family`` checkpoint with a tokenizer to ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    randomize_routers(model, family, seed)
    model.save_pretrained(out_dir)
    if family in PUBLISHED_ARCHITECTURE:
        config_json = out_dir / "config.json"
        config = json.loads(config_json.read_text())
        config["architectures"] = [PUBLISHED_ARCHITECTURE[family]]
        config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    build_tiny_tokenizer(out_dir)
    return out_dir
