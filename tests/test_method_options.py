"""Method options declared once: what the plan records, one-line errors, string coercion, the help,
and STUN's global threshold returned on a copy instead of set on the method."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from moeshrink.errors import MoeShrinkError
from moeshrink.methods import METHODS, get_method, method_option_help
from moeshrink.methods.stun import complete_linkage, expert_distances

MERGE = {"align": "weight", "router": "logsumexp", "reconstruct": True, "ridge": 0.01}
# What the plans recorded before the options were declared (key order included: plans are hashed).
DEFAULTS = {
    "random": {"seed": 0},
    "frequency": {"seed": 0},
    "soft_activation": {"seed": 0},
    "ean": {"seed": 0},
    "reap": {"seed": 0},
    "naee": {"seed": 0, "max_subsets": 20000, "max_tokens": 2048},
    "msmoe": {"seed": 0, **MERGE},
    "hcsmoe": {"seed": 0, **MERGE, "align": "none", "max_cluster_size": None},
    "uncurl": {"seed": 0, **MERGE},
    "stun": {  # reconstruct: true since the validation study, selective since issue #16 (docs/defaults.md)
        "seed": 0,
        "align": "weight",
        "router": "anchor",
        "reconstruct": True,
        "ridge": 0.01,
        "mode": "average",
        "coactivation": -1.0,
        "selective": True,
        "kept": "closest",
    },
    "none": {"seed": 0},
}


def _recorded(method) -> str:
    """The options as a plan writes them (order and types matter)."""
    return json.dumps(method.options)


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_recorded_as_before(name):
    assert set(DEFAULTS) == set(METHODS) | {"none"}
    assert _recorded(get_method(name)) == json.dumps(DEFAULTS[name])
    assert get_method(name, seed=7).options["seed"] == 7


@pytest.mark.parametrize(
    "name, options, recorded",
    [
        ("msmoe", {"reconstruct": False}, {"align": "weight", "router": "logsumexp", "reconstruct": False}),
        ("uncurl", {"align": None, "ridge": 1}, {**MERGE, "ridge": 1.0}),
        ("hcsmoe", {"max_cluster_size": 3.0}, {**MERGE, "align": "none", "max_cluster_size": 3}),
        (  # representative: nothing to align
            "stun",
            {"mode": "representative", "align": "activation"},
            {
                "align": "none",
                "router": "anchor",
                "reconstruct": False,
                "mode": "representative",
                "coactivation": -1.0,
            },
        ),
        (  # representative keeps its weights unless reconstruct is asked for
            "stun",
            {"mode": "representative", "reconstruct": True},
            {
                "align": "none",
                "router": "anchor",
                "reconstruct": True,
                "ridge": 0.01,
                "mode": "representative",
                "coactivation": -1.0,
            },
        ),
        (
            "stun",
            {"mode": "average", "coactivation": 0, "reconstruct": False, "selective": False},
            {
                "align": "weight",
                "router": "anchor",
                "reconstruct": False,
                "mode": "average",
                "coactivation": 0.0,
            },
        ),
        ("naee", {"max_tokens": 16}, {"max_subsets": 20000, "max_tokens": 16}),
    ],
)
def test_non_default_settings_recorded_as_before(name, options, recorded):
    expected = {"seed": 0} | {k: v for k, v in recorded.items() if k != "seed"}
    assert _recorded(get_method(name, **options)) == json.dumps(expected)


@pytest.mark.parametrize(
    "name, options, phrases",
    [
        (
            "uncurl",
            {"align": "sideways"},
            ["uncurl align must be one of weight, activation, none", "'sideways'"],
        ),
        ("msmoe", {"router": "nope"}, ["msmoe router must be one of average, anchor, logsumexp", "'nope'"]),
        ("stun", {"mode": "median"}, ["stun mode must be one of representative, average", "'median'"]),
        (
            "hcsmoe",
            {"max_cluster_size": 0},
            ["hcsmoe max_cluster_size must be an integer >= 1 or null", "got 0"],
        ),
        ("hcsmoe", {"ridge": -1}, ["hcsmoe ridge must be a number >= 0", "got -1"]),
        ("naee", {"max_subsets": 2.5}, ["naee max_subsets must be an integer >= 1", "got 2.5"]),
        ("naee", {"max_tokens": "many"}, ["naee max_tokens must be an integer >= 1", "got 'many'"]),
        ("stun", {"reconstruct": "maybe"}, ["stun reconstruct must be true or false", "got 'maybe'"]),
        ("stun", {"coactivation": "high"}, ["stun coactivation must be a number", "got 'high'"]),
    ],
)
def test_bad_values_give_one_line(name, options, phrases):
    with pytest.raises(MoeShrinkError) as err:
        get_method(name, **options)
    message = str(err.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message


def test_unknown_options_list_the_known_ones():
    with pytest.raises(MoeShrinkError, match="hcsmoe has no option 'cap'; known options: align, router, "):
        get_method("hcsmoe", cap=2)
    with pytest.raises(MoeShrinkError, match="frequency has no option 'align'; frequency takes no options"):
        get_method("frequency", align="weight")
    with pytest.raises(MoeShrinkError, match="stun option 'threshold' is found by the method, not given"):
        get_method("stun", threshold=0.5)  # set by the global budget, never by the user
    with pytest.raises(MoeShrinkError, match="unknown method 'nope'; known methods: "):
        get_method("nope")


def test_strings_from_the_command_line_are_coerced():
    """``--option KEY=VALUE`` values that are not JSON arrive as strings."""
    method = get_method("hcsmoe", max_cluster_size="3", reconstruct="false", ridge="0.5", router="average")
    assert method.options == {
        "seed": 0,
        "align": "none",
        "router": "average",
        "reconstruct": False,
        "max_cluster_size": 3,
    }
    assert get_method("stun", mode="average", coactivation="0.5").options["coactivation"] == 0.5
    assert get_method("naee", max_subsets="12").settings.max_subsets == 12
    assert get_method("uncurl", reconstruct="true", ridge="1").options["ridge"] == 1.0


def test_with_options_is_a_validated_copy():
    method = get_method("uncurl", seed=3, router="anchor")
    changed = method.with_options(reconstruct=False)
    assert changed is not method and type(changed) is type(method)
    assert changed.options == {"seed": 3, "align": "weight", "router": "anchor", "reconstruct": False}
    assert method.options["reconstruct"] is True and "ridge" in method.options
    assert changed.needs != method.needs  # derived from the settings
    with pytest.raises(MoeShrinkError, match="uncurl router must be one of"):
        method.with_options(router="median")


def test_method_option_help():
    lines = method_option_help("hcsmoe").splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "align",
        "router",
        "reconstruct",
        "ridge",
        "max_cluster_size",
    ]
    assert "max_cluster_size: int | null, default null, >= 1" in lines[-1]
    assert lines[0].startswith("align: str, default none, one of weight, activation, none")
    assert "threshold" not in method_option_help("stun")
    assert method_option_help("frequency") == ""
    with pytest.raises(MoeShrinkError, match="unknown method"):
        method_option_help("nope")


def _layers(seed: int = 0) -> dict[int, SimpleNamespace]:
    """Stand-ins for MoE layers: what STUN's global allocation reads (the router rows)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        i: SimpleNamespace(
            num_experts=8, router=SimpleNamespace(weight=torch.randn(8, 6, generator=generator))
        )
        for i in range(3)
    }


def test_stun_allocate_global_returns_a_copy_with_the_threshold():
    layers = _layers()
    stats = dict.fromkeys(layers)
    method = get_method("stun", coactivation=0.0)
    before = _recorded(method)
    counts, planner = method.allocate_global(layers, stats, total=15, minimum=2, groups=1)
    assert sum(counts.values()) == 15 and all(c >= 2 for c in counts.values())
    assert _recorded(method) == before and "threshold" not in method.options  # no side effect
    assert planner is not method and isinstance(planner, type(method))
    heights = sorted(
        float(h)
        for i, layer in layers.items()
        for h in complete_linkage(expert_distances(layer, None, 0.0))[: layer.num_experts - 2, 2]
    )
    assert planner.options == method.options | {"threshold": heights[24 - 15 - 1]}
    assert list(planner.options)[-1] == "threshold"


def test_default_allocate_global_returns_self():
    stats = {i: SimpleNamespace(counts=torch.arange(1.0, 9.0) * (i + 1)) for i in range(3)}
    method = get_method("frequency")
    counts, planner = method.allocate_global(_layers(), stats, total=15, minimum=2, groups=1)
    assert planner is method and sum(counts.values()) == 15
