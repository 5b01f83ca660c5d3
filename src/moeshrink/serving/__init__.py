"""Serving moeshrink outputs in inference engines.

A checkpoint whose MoE layers keep different numbers of experts (``moeshrink_experts_per_layer``) or
route to different numbers of experts per token (``moeshrink_top_k_per_layer``) is not the model that
an engine's standard class builds from the config (one count and one top-k for all layers). Such an
output names its architecture ``Moeshrink<Original>`` (e.g. ``MoeshrinkMixtralForCausalLM``): vLLM
without moeshrink's plugin then refuses it ("architecture not supported") instead of serving a
different model, and with the plugin (:mod:`moeshrink.serving.vllm_plugin`) serves it exactly.
transformers resolves the class from ``model_type``, so ``from_pretrained`` is unaffected.

Nothing here imports vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY

ARCHITECTURE_PREFIX = "Moeshrink"


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def is_per_layer(config: Any) -> bool:
    """Whether ``config`` (a config object or the config.json dict) has per-layer expert counts or
    per-layer top-k, which an engine's standard model class would not honour."""
    return bool(_get(config, PER_LAYER_KEY)) or bool(_get(config, TOP_K_PER_LAYER_KEY))


def plugin_architecture(architecture: str) -> str:
    """The architecture name of a per-layer output of ``architecture`` (idempotent)."""
    if architecture.startswith(ARCHITECTURE_PREFIX):
        return architecture
    return ARCHITECTURE_PREFIX + architecture


def base_architecture(architecture: str) -> str:
    """The engine's own architecture name behind a plugin name (unchanged when it has no prefix)."""
    return architecture.removeprefix(ARCHITECTURE_PREFIX)


def serving_architectures(config: Any, architectures: list[str]) -> list[str]:
    """The ``architectures`` entry to write for ``config``: the plugin's names when the config is
    per-layer (see :func:`is_per_layer`), the given names otherwise (also undoing the plugin's names,
    so a uniform re-export of a per-layer output is served by the engine's own class again)."""
    if is_per_layer(config):
        return [plugin_architecture(a) for a in architectures]
    return [base_architecture(a) for a in architectures]


def write_architectures(config_json: Path, source_architectures: list[str] | None) -> None:
    """Write ``architectures`` in an output's config.json: the source checkpoint's own names (which
    engines look up: Phi-3.5-MoE says ``PhiMoEForCausalLM`` where transformers' class is
    ``PhimoeForCausalLM``, and ``save_pretrained`` writes the class name), as the plugin's names for
    a per-layer output."""
    config = json.loads(config_json.read_text())
    names = source_architectures or config.get("architectures") or []
    config["architectures"] = serving_architectures(config, list(names))
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = [
    "ARCHITECTURE_PREFIX",
    "base_architecture",
    "is_per_layer",
    "write_architectures",
    "plugin_architecture",
    "serving_architectures",
]
