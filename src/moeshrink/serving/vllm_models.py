"""vLLM model classes for moeshrink's per-layer outputs; vLLM imports this module when it resolves a
``Moeshrink<Original>`` architecture (see :mod:`moeshrink.serving.vllm_plugin`). Needs vLLM.

Each class is vLLM's own class for the family with two changes, and only these:

1. **Construction.** Every family's MoE block reads its expert count and top-k from the shared
   config, and vLLM's Mixtral, Qwen2-MoE and DeepSeek models name their decoder-layer class inside
   ``__init__``. So while the model is built, the family module's ``make_layers`` (the one place
   every family builds decoder layer ``i``) is wrapped to build each layer with the config holding
   that layer's count (``moeshrink_experts_per_layer``) and top-k (``moeshrink_top_k_per_layer``);
   the config is restored afterwards. The experts stay vLLM's ``FusedMoE``, the routing its own.
2. **Weights.** Per-layer-count outputs store experts fused, as transformers holds them in memory
   (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``); these are handed
   to vLLM's loader as the per-expert tensors of the family's original checkpoint format (views, no
   copies), so vLLM's weight loading, including its check that every parameter was loaded, is reused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
import vllm
from vllm.config import VllmConfig
from vllm.model_executor.models import deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe
from vllm.model_executor.models.utils import extract_layer_index

from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY

TOP_K_KEY = "num_experts_per_tok"


@dataclass(frozen=True)
class FamilyLayout:
    """How one family's vLLM model reads its counts and names its MoE weights."""

    module: ModuleType  # the vLLM module whose ``make_layers`` builds the decoder layers
    count_key: str  # the config key its MoE block reads the routed-expert count from
    moe_name: str  # the MoE block's name in a decoder layer (vLLM and the original checkpoint)
    expert_names: tuple[str, str, str]  # per-expert gate, up and down names in the original checkpoint


SWIGLU = ("gate_proj", "up_proj", "down_proj")
MIXTRAL = FamilyLayout(mixtral, "num_local_experts", "block_sparse_moe", ("w1", "w3", "w2"))
QWEN2_MOE = FamilyLayout(qwen2_moe, "num_experts", "mlp", SWIGLU)
QWEN3_MOE = FamilyLayout(qwen3_moe, "num_experts", "mlp", SWIGLU)
OLMOE = FamilyLayout(olmoe, "num_experts", "mlp", SWIGLU)
DEEPSEEK = FamilyLayout(deepseek_v2, "n_routed_experts", "mlp", SWIGLU)

# Building a model rebinds a vLLM module's ``make_layers`` for the duration: one build at a time.
_BUILD_LOCK = threading.Lock()


def per_layer_values(config: Any, key: str, num_layers: int) -> list[int | None]:
    """The per-decoder-layer list under ``key`` (all None when the config has none), checked."""
    values = getattr(config, key, None)
    if not values:
        return [None] * num_layers
    if len(values) != num_layers:
        raise ValueError(
            f"config.json: {key} has {len(values)} entries but the model has {num_layers} decoder layers; "
            "re-export the checkpoint with moeshrink"
        )
    return [None if v is None else int(v) for v in values]


@contextmanager
def _config_values(configs: Sequence[Any], values: dict[str, int | None]) -> Iterator[None]:
    """Set ``values`` (None: leave as is) on every config object, and restore them afterwards."""
    saved = [(c, k, getattr(c, k)) for c in configs for k, v in values.items() if v is not None]
    try:
        for config, key, _ in saved:
            setattr(config, key, values[key])
        yield
    finally:
        for config, key, value in reversed(saved):
            setattr(config, key, value)


@contextmanager
def per_layer_build(
    layout: FamilyLayout, configs: Sequence[Any], counts: Sequence[int | None], top_k: Sequence[int | None]
) -> Iterator[None]:
    """While the model is built, build decoder layer ``i`` with ``configs`` holding ``counts[i]`` routed
    experts and top-``top_k[i]`` (None: the config's own value, e.g. for a dense layer)."""
    original: Callable[..., Any] = layout.module.make_layers

    def make_layers(num_hidden_layers: int, layer_fn: Callable[..., Any], prefix: str) -> Any:
        def build_layer(prefix: str) -> Any:
            index = extract_layer_index(prefix)
            with _config_values(configs, {layout.count_key: counts[index], TOP_K_KEY: top_k[index]}):
                return layer_fn(prefix=prefix)

        return original(num_hidden_layers, build_layer, prefix)

    with _BUILD_LOCK:
        layout.module.make_layers = make_layers
        try:
            yield
        finally:
            layout.module.make_layers = original


def built_moe_layers(model: torch.nn.Module) -> dict[int, tuple[int, int]]:
    """``{decoder layer: (routed experts, top-k)}`` of the fused-MoE layers vLLM built."""
    built: dict[int, tuple[int, int]] = {}
    for name, module in model.named_modules():
        moe_config = getattr(module, "moe_config", None)
        if moe_config is not None and hasattr(moe_config, "experts_per_token"):
            built[extract_layer_index(name)] = (moe_config.num_logical_experts, moe_config.experts_per_token)
    return built


def check_built(model: torch.nn.Module, counts: Sequence[int | None], top_k: Sequence[int | None]) -> None:
    """The MoE layers vLLM built are exactly the config's, with its counts and top-k (a mismatch would
    otherwise show up later as a weight-loading error or, for top-k, not at all)."""
    built = built_moe_layers(model)
    declared = {i for i, c in enumerate(counts) if c is not None}
    declared = declared or {i for i, k in enumerate(top_k) if k is not None}
    if declared and set(built) != declared:
        raise ValueError(
            f"{PER_LAYER_KEY}/{TOP_K_PER_LAYER_KEY} in config.json name MoE layers {sorted(declared)} "
            f"but vLLM built MoE layers {sorted(built)}: the config does not match the model"
        )
    for layer, (experts, k) in built.items():
        if counts[layer] is not None and experts != counts[layer]:
            raise ValueError(f"layer {layer}: built {experts} experts, config.json says {counts[layer]}")
        if top_k[layer] is not None and k != top_k[layer]:
            raise ValueError(f"layer {layer}: built top-{k}, config.json says top-{top_k[layer]}")


def per_expert_weights(
    weights: Iterable[tuple[str, torch.Tensor]], layout: FamilyLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with fused experts (transformers' in-memory names) given as the
    per-expert tensors of the family's original format; every other tensor passes unchanged."""
    gate_name, up_name, down_name = layout.expert_names
    for name, tensor in weights:
        if layout.moe_name != "mlp":  # Mixtral: transformers' ``mlp`` is the original ``block_sparse_moe``
            name = name.replace(".mlp.", f".{layout.moe_name}.")
        head, _, tail = name.rpartition(".experts.")
        if tail == "gate_up_proj" and tensor.dim() == 3:
            gate, up = tensor.chunk(2, dim=1)
            for expert in range(tensor.shape[0]):
                yield f"{head}.experts.{expert}.{gate_name}.weight", gate[expert]
                yield f"{head}.experts.{expert}.{up_name}.weight", up[expert]
        elif tail == "down_proj" and tensor.dim() == 3:
            for expert in range(tensor.shape[0]):
                yield f"{head}.experts.{expert}.{down_name}.weight", tensor[expert]
        else:
            yield name, tensor


# The vLLM releases whose model classes the plugin was built and tested against (their decoder-layer
# construction and weight loading are what it reuses).
SUPPORTED_VLLM = ("0.32",)


def check_vllm_version(version: str) -> None:
    """Refuse, with the supported range, a vLLM whose model classes the plugin does not know."""
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"moeshrink's vLLM plugin serves per-layer outputs with vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)} "
            f"(tested 0.32.0); this is vLLM {version}: install a supported vLLM, or export with a uniform budget "
            "(no --global-budget, no per-layer top-k), which any vLLM serves without the plugin"
        )


class PerLayerMoE:
    """Mixin before a vLLM ``*ForCausalLM`` class: per-layer expert counts and top-k (see the module
    docstring); everything else is the vLLM class's."""

    layout: ClassVar[FamilyLayout]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_vllm_version(vllm.__version__)
        model_config = vllm_config.model_config
        configs = list({id(c): c for c in (model_config.hf_config, model_config.hf_text_config)}.values())
        num_layers = configs[0].num_hidden_layers
        counts = per_layer_values(configs[0], PER_LAYER_KEY, num_layers)
        top_k = per_layer_values(configs[0], TOP_K_PER_LAYER_KEY, num_layers)
        if vllm_config.parallel_config.enable_eplb and len({c for c in counts if c is not None}) > 1:
            raise ValueError("expert load balancing (EPLB) needs one expert count in every MoE layer")
        with per_layer_build(self.layout, configs, counts, top_k):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_built(self, counts, top_k)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, fed per-expert tensors (see :func:`per_expert_weights`)."""
        return super().load_weights(per_expert_weights(weights, self.layout))


class MoeshrinkMixtralForCausalLM(PerLayerMoE, mixtral.MixtralForCausalLM):
    layout = MIXTRAL


class MoeshrinkQwen2MoeForCausalLM(PerLayerMoE, qwen2_moe.Qwen2MoeForCausalLM):
    layout = QWEN2_MOE


class MoeshrinkQwen3MoeForCausalLM(PerLayerMoE, qwen3_moe.Qwen3MoeForCausalLM):
    layout = QWEN3_MOE


class MoeshrinkOlmoeForCausalLM(PerLayerMoE, olmoe.OlmoeForCausalLM):
    layout = OLMOE


class MoeshrinkDeepseekV2ForCausalLM(PerLayerMoE, deepseek_v2.DeepseekV2ForCausalLM):
    layout = DEEPSEEK


class MoeshrinkDeepseekV3ForCausalLM(PerLayerMoE, deepseek_v2.DeepseekV3ForCausalLM):
    layout = DEEPSEEK
