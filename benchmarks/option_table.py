"""Option study table: which variant of a method served the held-out split best.

Reads a results file of benchmarks/quality.py and prints, per variant (method and options), the
perplexity ratio to the unpruned model as a geometric mean over the calibration domains: on the
calibrated domain, on the other domains, and over all (calibration, evaluation) domain pairs; the
last column is that over every budget given. The lowest per method and column is in bold. This is
the rule that chose the defaults in docs/defaults.md. ``--variants`` shows only the variants named
(exactly as in the results file); ``--total-sparsity`` shows the rows pruned to a total sparsity
(Wanda / OWL / STUN + Wanda), which are otherwise left out.

    python benchmarks/option_table.py docs/validation_study.json --keep 8 4 --methods msmoe hcsmoe uncurl
    python benchmarks/option_table.py docs/validation_study.json --keep 16 --total-sparsity --methods none
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moeshrink.report.tables import markdown_table


def log_ratios(row: dict, base: dict, calibrated: str) -> tuple[list[float], list[float]]:
    """Log perplexity ratios to the baseline, on the calibrated domain and on the others."""
    own, other = [], []
    for domain, result in row["domains"].items():
        ratio = math.log(result["perplexity"] / base["domains"][domain]["perplexity"])
        (own if domain == calibrated else other).append(ratio)
    return own, other


def geo(logs: list[float]) -> float:
    """Geometric mean of the ratios whose logs are given (nan when none)."""
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def option_rows(
    data: dict,
    keeps: list[int],
    methods: list[str] | None,
    variants: list[str] | None = None,
    total_sparsity: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the study table for ``keeps`` and the variants of ``methods`` (only those in
    ``variants`` when given); rows pruned to a total sparsity instead of the others with ``total_sparsity``."""
    base = data["baseline"]
    cells: dict[str, dict[int, dict[str, list[float]]]] = {}
    for key, row in data["rows"].items():
        variant, keep, calibrated = key.split("|")
        if int(keep) not in keeps or "+global" in variant:
            continue  # equal per-layer budgets only
        if ("total_sparsity" in row.get("sparsity", {})) != total_sparsity:
            continue
        if (methods and variant.split(":")[0] not in methods) or (variants and variant not in variants):
            continue
        own, other = log_ratios(row, base, calibrated)
        slot = cells.setdefault(variant, {}).setdefault(int(keep), {"own": [], "other": []})
        slot["own"] += own
        slot["other"] += other
    header = ["method", "options"]
    for keep in keeps:
        header += [f"16→{keep} calibrated", f"16→{keep} other", f"16→{keep} all"]
    header.append("all budgets")
    values: dict[str, list[float]] = {}
    for variant, by_keep in cells.items():
        vals: list[float] = []
        every: list[float] = []
        for keep in keeps:
            slot = by_keep.get(keep, {"own": [], "other": []})
            vals += [geo(slot["own"]), geo(slot["other"]), geo(slot["own"] + slot["other"])]
            every += slot["own"] + slot["other"]
        values[variant] = [*vals, geo(every)]
    best: dict[tuple[str, int], float] = {}
    for variant, vals in values.items():
        method = variant.split(":")[0]
        for i, v in enumerate(vals):
            if not math.isnan(v):
                best[(method, i)] = min(best.get((method, i), math.inf), v)
    rows = []
    for variant, vals in values.items():
        method, _, options = variant.partition(":")
        shown = [
            "" if math.isnan(v) else (f"**{v:.3f}**" if v == best[(method, i)] else f"{v:.3f}")
            for i, v in enumerate(vals)
        ]
        rows.append([method, options or "(defaults)", *shown])
    rows.sort(key=lambda r: r[0])
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="OUT.json of benchmarks/quality.py")
    parser.add_argument("--keep", type=int, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", help="base method names (default: all)")
    parser.add_argument("--variants", nargs="+", help="only these variants (METHOD:options, as in the file)")
    parser.add_argument("--total-sparsity", action="store_true", help="the rows pruned to a total sparsity")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    split = data["settings"].get("split", "the previous test split")
    calib = ", ".join(data["settings"]["calib_domains"])
    print(f"Split: {split}; calibration domains: {calib}; perplexity ratio to the unpruned model.\n")
    print(markdown_table(*option_rows(data, args.keep, args.methods, args.variants, args.total_sparsity)))


if __name__ == "__main__":
    main()
