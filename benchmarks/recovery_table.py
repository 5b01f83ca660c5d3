"""With and without recovery, side by side, from a ``benchmarks/quality.py`` results file.

For every method and budget that has both a plain row (``METHOD``) and a recovery row
(``METHOD:recover=true`` plus ``--suffix``), the perplexity ratio to the unpruned model on the
calibrated domain and on the other domains (geometric means over the calibration domains, as
quality.py's summary) and the recover step's mean relative layer error before and after (from the
plans). ``--ridges`` instead lists every recovery row of each method and budget, by ridge (for
choosing the default on the validation split).

    python benchmarks/recovery_table.py docs/recovery_test.json
    python benchmarks/recovery_table.py docs/recovery_validation.json --ridges
    python benchmarks/recovery_table.py docs/recovery_cost.json --cost
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moeshrink.report.tables import markdown_table

RECOVER = ":recover=true"
MIXED = "mixed"  # quality.py's general calibration: the four domains' calib text together


def ratios(data: dict, method: str, keep: int) -> tuple[float, float, float, list[dict]] | None:
    """Geometric mean perplexity ratios (calibrated domain, other domains, all) and the rows' recoveries."""
    base = data["baseline"]["domains"]
    own, other, recoveries = [], [], []
    for key, row in data["rows"].items():
        name, k, calib = key.split("|")
        if name != method or int(k) != keep:
            continue
        for domain, measured in row["domains"].items():
            r = math.log(measured["perplexity"] / base[domain]["perplexity"])
            (own if domain == calib else other).append(r)  # own stays empty under mixed calibration
        if row.get("recovery"):
            recoveries.append(row["recovery"])
    if not own and not other:
        return None
    mean = lambda xs: math.exp(sum(xs) / len(xs)) if xs else None  # noqa: E731
    return mean(own), mean(other), mean(own + other), recoveries


def _ratio(value: float | None, bold: bool = False) -> str:
    """A ratio to 3 decimals (bold if asked), ``-`` where there is none (no calibrated domain under mixed calibration)."""
    if value is None:
        return "-"
    return f"**{value:.3f}**" if bold else f"{value:.3f}"


def _budget(data: dict, keep: int) -> str:
    return f"{data.get('settings', {}).get('experts', 16)} -> {keep}"


def error_text(recoveries: list[dict]) -> str:
    if not recoveries:
        return ""
    before = sum(r["mean_before"] for r in recoveries) / len(recoveries)
    after = sum(r["mean_after"] for r in recoveries) / len(recoveries)
    return f"{before:.4f} -> {after:.4f}"


def side_by_side(data: dict, suffix: str) -> str:
    keeps = sorted({int(k.split("|")[1]) for k in data["rows"]}, reverse=True)
    methods = list(dict.fromkeys(k.split("|")[0] for k in data["rows"] if ":" not in k.split("|")[0]))
    table = []
    for keep in keeps:
        for method in methods:
            plain, recovered = ratios(data, method, keep), ratios(data, method + RECOVER + suffix, keep)
            if plain is None or recovered is None:
                continue
            table.append(
                [
                    _budget(data, keep),
                    method,
                    _ratio(plain[0]),
                    _ratio(recovered[0], plain[0] is not None and recovered[0] < plain[0]),
                    _ratio(plain[1]),
                    _ratio(recovered[1], plain[1] is not None and recovered[1] < plain[1]),
                    error_text(recovered[3]),
                    ", ".join(str(r.get("router_fitted_layers", "?")) for r in recovered[3]),
                ]
            )
    header = [
        "budget",
        "method",
        "calibrated domain, without",
        "with recovery",
        "other domains, without",
        "with recovery",
        "layer error before -> after",
        "layers whose router rows were re-fitted",
    ]
    if all(k.split("|")[2] == MIXED for k in data["rows"]):  # no calibrated domain: every one is in it
        header[4:6] = ["all four domains, without", "with recovery"]
        header, table = header[:2] + header[4:], [row[:2] + row[4:] for row in table]
    return markdown_table(header, table)


def by_ridge(data: dict) -> str:
    keeps = sorted({int(k.split("|")[1]) for k in data["rows"]}, reverse=True)
    names = list(dict.fromkeys(k.split("|")[0] for k in data["rows"]))
    table = []
    for keep in keeps:
        for name in names:
            found = ratios(data, name, keep)
            if found is None:
                continue
            method, _, variant = name.partition(":")
            variant = ",".join(o for o in variant.split(",") if o and not o.startswith("recover_ridge="))
            ridge = found[3][0]["ridge"] if found[3] else "-"
            cells = [
                _budget(data, keep),
                method,
                variant.replace("recover=true", "recover") or "-",
                str(ridge),
            ]
            table.append(cells + [_ratio(found[0]), _ratio(found[1]), _ratio(found[2]), error_text(found[3])])
    header = [
        "budget",
        "method",
        "variant",
        "ridge",
        "calibrated domain",
        "other domains",
        "all domains",
        "layer error",
    ]
    return markdown_table(header, table)


def by_variant(data: dict) -> str:
    """Each variant (the options after the method) over every method and budget it has rows for: the
    geometric mean of the all-domain and calibrated-domain ratios (the criterion for the default)."""
    keeps = {int(k.split("|")[1]) for k in data["rows"]}
    names = list(dict.fromkeys(k.split("|")[0] for k in data["rows"]))
    variants: dict[str, list[tuple[float, float]]] = {}
    for name in names:
        for keep in keeps:
            found = ratios(data, name, keep)
            if found is not None:
                variants.setdefault(name.partition(":")[2] or "-", []).append((found[2], found[0]))

    def mean(xs: list[float | None]) -> str:
        xs = [x for x in xs if x is not None]
        return f"{math.exp(sum(math.log(x) for x in xs) / len(xs)):.4f}" if xs else "-"

    table = [
        [variant, str(len(cells)), mean([c[0] for c in cells]), mean([c[1] for c in cells])]
        for variant, cells in variants.items()
    ]
    return markdown_table(["variant", "cells (method x budget)", "all domains", "calibrated domain"], table)


def cost_table(data: dict) -> str:
    """From a ``benchmarks/cost.py`` OUT.json: each method's compression with and without recovery, in
    CPU seconds and as a ratio to the forward pass of the floors run next to it (same run)."""
    rows = {
        (r["method"], r["keep"]): r for r in data["rows"] if r.get("kind") == "prune" and "error" not in r
    }
    table = []
    for (method, keep), plain in rows.items():
        recovered = rows.get((method + RECOVER, keep))
        if ":" in method or recovered is None:
            continue
        added = recovered["compress_cpu_seconds"] - plain["compress_cpu_seconds"]
        floor = recovered["floor_forward_cpu_seconds"]
        loads = plain["load_1min"] + recovered["load_1min"]
        table.append(
            [
                f"16 -> {keep}",
                method,
                f"{plain['compress_cpu_seconds']:.1f} ({plain['compress_cpu_over_forward_cpu']:.1f}x)",
                f"{recovered['compress_cpu_seconds']:.1f} ({recovered['compress_cpu_over_forward_cpu']:.1f}x)",
                f"{added:.1f} ({added / floor:.1f}x)",
                f"{floor:.1f}",
                f"{min(loads):.1f}-{max(loads):.1f}",
            ]
        )
    header = [
        "budget",
        "method",
        "compress CPU s without (x forward)",
        "with recovery",
        "recovery adds (x forward)",
        "floor forward CPU s",
        "1-min load",
    ]
    return markdown_table(header, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a quality.py OUT.json")
    parser.add_argument("--suffix", default="", help="options after recover=true in the recovery rows")
    parser.add_argument("--ridges", action="store_true", help="every row by ridge (validation)")
    parser.add_argument("--cost", action="store_true", help="RESULTS is a cost.py OUT.json")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    if args.cost:
        print(cost_table(data))
    elif args.ridges:
        print(by_ridge(data) + "\n\n" + by_variant(data))
    else:
        print(side_by_side(data, args.suffix))


if __name__ == "__main__":
    main()
