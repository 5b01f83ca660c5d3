"""Expert-level methods, by name."""

from __future__ import annotations

from typing import Any

from moeshrink.errors import MoeShrinkError
from moeshrink.methods.base import ExpertMethod, LayerBudget, ScorePruning, top_scores
from moeshrink.methods.ean import EANPruning
from moeshrink.methods.frequency import FrequencyPruning
from moeshrink.methods.hcsmoe import HCSMoE
from moeshrink.methods.keep_all import KeepAll
from moeshrink.methods.msmoe import MSMoE
from moeshrink.methods.naee import NAEEPruning
from moeshrink.methods.random import RandomPruning
from moeshrink.methods.reap import REAPPruning
from moeshrink.methods.soft_activation import SoftActivationPruning
from moeshrink.methods.stun import STUN
from moeshrink.methods.uncurl import UNCURL

METHODS: dict[str, type[ExpertMethod]] = {
    m.name: m
    for m in (
        RandomPruning,
        FrequencyPruning,
        SoftActivationPruning,
        EANPruning,
        REAPPruning,
        NAEEPruning,
        MSMoE,
        HCSMoE,
        UNCURL,
        STUN,
    )
}


def get_method(name: str, seed: int = 0, **options: Any) -> ExpertMethod:
    """Build the method ``name`` with its options, or a one-line error listing the known methods.
    ``none`` (keep every expert) is accepted too; it is not among the compression methods."""
    key = name.replace("-", "_").lower()
    known = METHODS | {KeepAll.name: KeepAll}
    if key not in known:
        raise MoeShrinkError(f"unknown method '{name}'; known methods: {', '.join(sorted(known))}")
    try:
        return known[key](seed=seed, **options)
    except TypeError as e:
        raise MoeShrinkError(f"method '{name}': {e}") from e


__all__ = ["METHODS", "KeepAll", "ExpertMethod", "LayerBudget", "ScorePruning", "get_method", "top_scores"]
