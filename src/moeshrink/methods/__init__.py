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
from moeshrink.methods.options import MethodOptions, describe
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


def _method_class(name: str) -> type[ExpertMethod]:
    """The class of method ``name`` (``-`` or ``_``, any case), or a one-line error listing the known ones."""
    key = name.replace("-", "_").lower()
    known = METHODS | {KeepAll.name: KeepAll}
    if key not in known:
        raise MoeShrinkError(f"unknown method '{name}'; known methods: {', '.join(sorted(known))}")
    return known[key]


def get_method(name: str, seed: int = 0, **options: Any) -> ExpertMethod:
    """Build the method ``name`` with its options, validated against the method's declared ``Options``
    (strings from ``--option KEY=VALUE`` are coerced where they can be); every mistake is a one-line
    :class:`MoeShrinkError`. ``none`` (keep every expert) is accepted too; it is not among the
    compression methods."""
    cls = _method_class(name)
    found = sorted(set(options) & cls.Options.found)
    if found:
        raise MoeShrinkError(
            f"{cls.name} option {found[0]!r} is found by the method, not given; "
            f"known options: {', '.join(cls.Options.given())}"
        )
    return cls(seed=seed, **options)


def method_option_help(name: str) -> str:
    """The options of method ``name`` for the command-line help, one line each: name, type, default,
    range (empty when the method takes none)."""
    return describe(_method_class(name).Options)


__all__ = [
    "METHODS",
    "KeepAll",
    "ExpertMethod",
    "LayerBudget",
    "MethodOptions",
    "ScorePruning",
    "get_method",
    "method_option_help",
    "top_scores",
]
