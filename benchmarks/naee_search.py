"""NAEE's subset search on the testbed: the chosen subsets, errors and CPU time of this tree's search
against another commit's (``--before``) on the same layers, and the greedy fallback's gap.

The layers are those ``moeshrink prune`` plans (calibration as in ``benchmarks/cost.py``: 64 x 256
tokens of one domain's calib split, batch 8, one thread); each NAEE ``plan_layer`` call is
intercepted and, on the same layer and statistics, also run (a) with ``max_subsets=1`` (the greedy
fallback) and (b) with the search of the ``--before`` commit, imported from ``git show``. Every
time is CPU seconds of this process (one thread), each beside a floor measured in the same
invocation: one pass of the calibration tokens through the unpruned model's decoder layers (the
floor of ``benchmarks/cost.py``), run before and after the prunes; the 1-minute load average is
recorded at each step.

    python benchmarks/naee_search.py --keep 8 4 --domains wiki pydoc --before 35c434b --out docs/naee_search.json
    python benchmarks/naee_search.py --report docs/naee_search.json
    python benchmarks/naee_search.py --model src/moeshrink/testbed/data/moeshrink-tiny-ds3 --keep 32 16 ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def old_module(commit: str):
    """``moeshrink.methods.naee`` as it was at ``commit``."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/moeshrink/methods/naee.py"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"naee_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"naee_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def floor_cpu(model: Path, calib: str, samples: int, seq_len: int, batch: int) -> float:
    """CPU seconds of the cost benchmark's floor forward pass (in this process)."""
    from cost import _floor

    job = {"model": str(model), "calib": calib, "samples": samples, "seq_len": seq_len}
    job |= {"batch_size": batch, "stream": False}
    return _floor(job)()["cpu_steps"]["forward"]


def report(paths: list[Path]) -> str:
    """Markdown tables from the JSON files of earlier runs: per domain and keep, the search's CPU time
    (4 layers) against the floor, the old search's and whether every layer chose the same subset;
    the greedy fallback against the exhaustive optimum."""
    runs = [entry for path in paths for entry in json.loads(path.read_text())["runs"]]
    lines = [
        "| domain | keep | subsets per layer | search CPU s (all MoE layers) | / floor | before CPU s | / floor "
        "| same subsets | greedy = exhaustive | greedy error / exhaustive (max) | search | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["domain"], -r["keep"])):
        layers, floor = r["layers"], min(r["floor_cpu_s"])
        same = f"{sum(x['same_subset'] for x in layers)}/{len(layers)}" if "before_search_cpu_s" in r else ""
        before = f"{r['before_search_cpu_s']:.2f}" if "before_search_cpu_s" in r else ""
        before_ratio = f"{r['before_search_over_floor']:.1f}" if "before_search_cpu_s" in r else ""
        exhaustive = [x for x in layers if x["search"] == "exhaustive"]
        equal = sum(x["greedy_kept"] == x["kept"] for x in exhaustive)
        # no exhaustive layer (e.g. C(16, 8) per group at 64 -> 32): no gap to measure
        worst = f"{max(x['greedy_over_exhaustive'] for x in exhaustive):.4f}" if exhaustive else "-"
        search = ", ".join(sorted({x["search"] for x in layers}))
        lines.append(
            f"| {r['domain']} | {r['keep']} | {layers[0]['subsets']:,} | {r['new_search_cpu_s']:.2f} | "
            f"{r['new_search_cpu_s'] / floor:.1f} | {before} | {before_ratio} | {same} | "
            f"{equal}/{len(exhaustive)} | {worst} | {search} | {r['load_1min'][0]:.1f}–{r['load_1min'][1]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the Mixtral testbed)")
    parser.add_argument("--keep", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--domains", nargs="+", default=["wiki"])
    parser.add_argument("--before", help="commit whose NAEE search to time and compare on the same layers")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, nargs="+", help="print the tables of these runs' JSON files")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(1)

    import moeshrink
    from moeshrink.methods.naee import NAEEPruning
    from moeshrink.testbed import paths

    model = args.model or paths.testbed_model_dir()
    before = old_module(args.before) if args.before else None
    rows: list[dict] = []
    current: dict = {}
    plan_layer = NAEEPruning.plan_layer

    def intercept(self, layer, stats, budget):
        t = time.process_time()
        plan = plan_layer(self, layer, stats, budget)
        row = current | {"layer": layer.index, "new_cpu_s": time.process_time() - t}
        row |= {"kept": [e.sources[0] for e in plan.experts], "search": plan.details["search"]}
        row |= {"error": plan.details["error"], "subsets": plan.details["subsets_evaluated"]}
        # tokens with two equal router logits (their top-k order is torch's own; searched by routing)
        logits = stats.logits[: self.settings.max_tokens].float().sort(dim=1).values
        row |= {"tokens": logits.shape[0], "tied_tokens": int((logits[:, 1:] == logits[:, :-1]).any(1).sum())}
        if plan.details["search"] == "exhaustive":
            greedy = plan_layer(self.with_options(max_subsets=1), layer, stats, budget)
            row |= {
                "greedy_kept": [e.sources[0] for e in greedy.experts],
                "greedy_error": greedy.details["error"],
            }
            row["greedy_over_exhaustive"] = greedy.details["error"] / plan.details["error"]
            row["greedy_subsets"] = greedy.details["subsets_evaluated"]
        if before is not None:
            t = time.process_time()
            old = before.NAEEPruning().plan_layer(layer, stats, budget)
            row |= {"before_cpu_s": time.process_time() - t, "before_error": old.details["error"]}
            row["before_kept"] = [e.sources[0] for e in old.experts]
            row["same_subset"] = row["before_kept"] == row["kept"]
        row["load_1min"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return plan

    NAEEPruning.plan_layer = intercept
    run = {"command": "python benchmarks/naee_search.py " + " ".join(sys.argv[1:]), "runs": []}
    run["model"] = str(model)
    run["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    run["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    settings = {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size}
    for domain in args.domains:
        calib = str(paths.corpus_dir() / domain / "calib.jsonl")
        for keep in args.keep:
            floors = [floor_cpu(model, calib, args.samples, args.seq_len, args.batch_size)]
            current = {"domain": domain, "keep": keep}
            first = len(rows)
            t = time.process_time()
            moeshrink.prune(model, "naee", keep=keep, calib=calib, progress=False, **settings)
            total = time.process_time() - t
            floors.append(floor_cpu(model, calib, args.samples, args.seq_len, args.batch_size))
            layers = rows[first:]
            entry = current | {"floor_cpu_s": floors, "prune_cpu_s_with_extra_searches": total}
            entry["new_search_cpu_s"] = sum(r["new_cpu_s"] for r in layers)
            entry["new_search_over_floor"] = entry["new_search_cpu_s"] / min(floors)
            if before is not None:
                entry["before_search_cpu_s"] = sum(r["before_cpu_s"] for r in layers)
                entry["before_search_over_floor"] = entry["before_search_cpu_s"] / min(floors)
                entry["same_subsets"] = all(r["same_subset"] for r in layers)
            entry["load_1min"] = [min(r["load_1min"] for r in layers), max(r["load_1min"] for r in layers)]
            entry["layers"] = layers
            run["runs"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "layers"}), flush=True)
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.out:
        args.out.write_text(json.dumps(run, indent=1) + "\n")


if __name__ == "__main__":
    main()
