"""moeshrink's vLLM plugin: serves per-layer outputs (different expert counts or top-k per layer).

vLLM calls :func:`register` in each of its processes through the ``vllm.general_plugins`` entry point.
It registers, for every covered family, the architecture name a per-layer output carries
(``Moeshrink<Original>``, see :mod:`moeshrink.serving`) with the class in
:mod:`moeshrink.serving.vllm_models`, lazily: vLLM imports that module only when such a checkpoint
is loaded. This module imports nothing from vLLM at import time, so it is safe without vLLM.
"""

from __future__ import annotations

from moeshrink.serving import plugin_architecture

# vLLM's own architecture -> the plugin class serving its per-layer outputs (same name as the
# architecture a per-layer output of it carries).
PLUGIN_CLASSES: dict[str, str] = {
    arch: plugin_architecture(arch)
    for arch in (
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    )
}
MODELS_MODULE = "moeshrink.serving.vllm_models"


def register() -> None:
    """Register the plugin's model classes with vLLM's ModelRegistry (idempotent; a no-op without vLLM)."""
    try:
        from vllm import ModelRegistry
    except ImportError:
        return
    for name in PLUGIN_CLASSES.values():
        ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")
