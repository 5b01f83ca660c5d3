"""benchmarks/option_table.py (the rule that chooses defaults) and quality.py's row labels, on a
hand-made results file: geometric means of perplexity ratios, the variant and total-sparsity filters."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


option_table = _load("option_table")
quality = _load("quality")

BASE = {"domains": {"wiki": {"perplexity": 10.0}, "pydoc": {"perplexity": 20.0}}}


def _row(wiki: float, pydoc: float, sparsity: dict | None = None) -> dict:
    row = {"domains": {"wiki": {"perplexity": wiki}, "pydoc": {"perplexity": pydoc}}}
    return row | ({"sparsity": sparsity} if sparsity else {})


DATA = {
    "baseline": BASE,
    "rows": {
        "uncurl:a=1|8|wiki": _row(11.0, 40.0),  # calibrated 1.1, other 2.0
        "uncurl:a=1|8|pydoc": _row(30.0, 22.0),  # calibrated 1.1, other 3.0
        "uncurl:a=2|8|wiki": _row(12.0, 20.0),
        "none:sparsity_method=owl,total_sparsity=0.5|16|wiki": _row(13.0, 26.0, {"total_sparsity": 0.5}),
    },
}


def test_geometric_means_and_variant_filter():
    header, rows = option_table.option_rows(DATA, [8], ["uncurl"], variants=["uncurl:a=1"])
    assert header == ["method", "options", "16→8 calibrated", "16→8 other", "16→8 all", "all budgets"]
    assert len(rows) == 1 and rows[0][:2] == ["uncurl", "a=1"]
    calibrated, other = 1.1, math.sqrt(2.0 * 3.0)
    every = (1.1 * 1.1 * 2.0 * 3.0) ** 0.25
    assert [float(c.strip("*")) for c in rows[0][2:]] == pytest.approx(
        [calibrated, other, every, every], abs=5e-4
    )


def test_total_sparsity_rows_only_when_asked():
    _, plain = option_table.option_rows(DATA, [8, 16], None)
    assert {r[1] for r in plain} == {"a=1", "a=2"}
    _, sparse = option_table.option_rows(DATA, [16], None, total_sparsity=True)
    assert [r[:2] for r in sparse] == [["none", "sparsity_method=owl,total_sparsity=0.5"]]
    assert float(sparse[0][2].strip("*")) == pytest.approx(1.3)  # calibrated on wiki: 13 / 10


def test_sparse_rows_are_labelled_by_their_options():
    assert (
        quality._sparse_label("none:sparsity_method=owl,total_sparsity=0.55", {"method": "owl"})
        == "owl alone"
    )
    assert (
        quality._sparse_label(
            "none:sparsity_method=owl,total_sparsity=0.55,owl_lambda=0.02", {"method": "owl"}
        )
        == "owl alone (owl_lambda=0.02)"
    )
    assert (
        quality._sparse_label("stun:mode=average,reconstruct=true,total_sparsity=0.4", {"method": "wanda"})
        == "stun (mode=average,reconstruct=true) + wanda"
    )
