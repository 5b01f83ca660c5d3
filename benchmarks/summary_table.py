"""The headline table of issue #16: every expert-level method, by family, with and without recovery,
in the two settings users ask about, with cost as a ratio to a floor from the same run.

* **16 -> 8, general calibration**: calibrated on the four domains' calib text together
  (``quality.py --calib-domains mixed``), perplexity ratio to the unpruned model on all four domains.
* **16 -> 4, task calibration**: calibrated on one domain's calib text (bible), ratio on that domain
  and on the others; EEP rows come from ``eep_text.py`` (the search on the same text).

Quality comes from a ``benchmarks/quality.py`` results file (test split), cost from a
``benchmarks/cost.py`` results file (each method's layer-loop CPU seconds over the floor's forward
pass, both in that run) and, for EEP, from its ``eep_text.py`` run (wall seconds over the adjacent
floors of that run). Every method is listed: no row is picked by looking at the test numbers.

    python benchmarks/summary_table.py --quality docs/summary_test.json --cost docs/summary_cost.json \\
        --eep docs/eep_recover_test.json   # the tables of docs/summary.md
    python benchmarks/summary_table.py --quality docs/quality_ds3_general.json docs/quality_ds3_task.json \\
        --cost docs/summary_cost_ds3.json --eep docs/eep_text_ds3_test.json   # docs/ds3.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moeshrink.report.tables import markdown_table

FAMILIES = {
    "score pruning": ["frequency", "reap"],
    "subset search": ["naee"],
    "router-weight clustering": ["stun"],
    "merging": ["msmoe", "hcsmoe", "uncurl"],
}
RECOVER = "recover=true"


def geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def quality(data: dict, method: str, keep: int, calib: str) -> tuple[float | None, float] | None:
    """(ratio on the calibrated domain or None for mixed calibration, ratio on the other domains)."""
    row = data["rows"].get(f"{method}|{keep}|{calib}")
    if row is None:
        return None
    base = data["baseline"]["domains"]
    ratio = {d: row["domains"][d]["perplexity"] / base[d]["perplexity"] for d in base}
    own = ratio.get(calib)
    return own, geo([r for d, r in ratio.items() if d != calib])


def cost(data: dict | None, method: str, keep: int) -> str:
    """compress CPU / forward CPU of ``method`` (``name`` or ``name:recover=true``) at ``keep``."""
    if data is None:
        return "-"
    for row in data["rows"]:
        if row.get("kind") == "prune" and row["method"] + _options(row) == method and row["keep"] == keep:
            return f"{row['compress_cpu_over_forward_cpu']:.1f}x"
    return "-"


def _options(row: dict) -> str:
    options = row.get("options") or {}
    return ":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""


def with_recovery(method: str) -> str:
    return f"{method}:{RECOVER}"


def section(quality_data: dict, cost_data: dict | None, eep: dict | None, keep: int, calib: str) -> list[str]:
    experts = quality_data["experts"]
    if calib == "mixed":
        title = f"## {experts} -> {keep}, general calibration (the four domains' calib text together)"
        header = ["family", "method", "all domains, without", "with recovery", "cost without", "cost with"]
    else:
        title = f"## {experts} -> {keep}, task calibration ({calib})"
        header = [
            "family",
            "method",
            f"{calib}, without",
            "with recovery",
            "other domains, without",
            "with recovery",
            "cost without",
            "cost with",
        ]
    rows = []
    for family, methods in FAMILIES.items():
        for method in methods:
            plain, recovered = (
                quality(quality_data, method, keep, calib),
                quality(quality_data, with_recovery(method), keep, calib),
            )
            if plain is None:
                continue
            cells = [family, method]
            if calib == "mixed":
                cells += [f"{plain[1]:.3f}", f"{recovered[1]:.3f}" if recovered else "-"]
            else:
                cells += [
                    f"{plain[0]:.3f}",
                    f"{recovered[0]:.3f}" if recovered else "-",
                    f"{plain[1]:.3f}",
                    f"{recovered[1]:.3f}" if recovered else "-",
                ]
            cells += [cost(cost_data, method, keep), cost(cost_data, with_recovery(method), keep)]
            rows.append(cells)
    if eep is not None and calib != "mixed" and eep["settings"]["keep"] == keep:
        eep_row = _eep_rows(eep, calib)
        if eep_row:
            rows.append(eep_row)
    return [title, "", markdown_table(header, rows), ""]


def _eep_rows(eep: dict, calib: str) -> list[str] | None:
    """EEP's default search without and with recovery, from an eep_text.py run on ``calib`` text."""
    plain, recovered = eep["rows"].get("eep: default"), eep["rows"].get("eep: with recovery")
    if plain is None or eep["settings"]["domain"] != calib:
        return None
    base = eep["baseline"]
    others = [d for d in base if d != calib]

    def ratios(row: dict | None) -> tuple[str, str, str]:
        if row is None:
            return "-", "-", "-"
        p = row["perplexity"]
        return (
            f"{p[calib] / base[calib]:.3f}",
            f"{geo([p[d] / base[d] for d in others]):.3f}",
            f"{row['cost_over_floor']:.1f}x wall",
        )

    a, b = ratios(plain), ratios(recovered)
    return ["evolutionary search", "eep (search on the text)", a[0], b[0], a[1], b[1], a[2], b[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quality",
        type=Path,
        nargs="+",
        required=True,
        help="quality.py OUT.json files of one model (test split)",
    )
    parser.add_argument("--cost", type=Path, help="a cost.py OUT.json with the same methods")
    parser.add_argument("--eep", type=Path, help="an eep_text.py OUT.json (task calibration)")
    parser.add_argument("--out", type=Path, help="write the tables here (default: print them)")
    args = parser.parse_args()
    files = [json.loads(p.read_text()) for p in args.quality]
    quality_data = {"baseline": files[0]["baseline"], "rows": {}}
    for data in files:
        if data["baseline"] != quality_data["baseline"] or data["settings"].get("split") != "test":
            raise SystemExit("--quality: give test-split results of one model (their baselines differ)")
        quality_data["rows"].update(data["rows"])
    model = Path(files[0]["settings"]["model"])
    config = json.loads((model / "config.json").read_text())
    quality_data["experts"] = config.get("n_routed_experts") or config.get("num_local_experts", 16)
    cost_data = json.loads(args.cost.read_text()) if args.cost else None
    eep = json.loads(args.eep.read_text()) if args.eep else None
    settings = dict.fromkeys((int(k.split("|")[1]), k.split("|")[2]) for k in quality_data["rows"])
    lines = []
    for keep, calib in sorted(settings, key=lambda s: (s[1] != "mixed", -s[0])):
        lines += section(quality_data, cost_data, eep, keep, calib)
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
