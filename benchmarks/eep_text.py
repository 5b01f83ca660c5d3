"""EEP from plain text on the testbed's task setting: one domain's calibration text, E -> K experts.

Every search runs ``moeshrink search --calib`` as a user does (fitness on windows of the domain's calib
split, selection on held-out windows of the same text) and every one-shot method calibrates on the
same file (64 x 256 tokens, as ``benchmarks/quality.py``). Each model is scored by perplexity on the
``--split`` text of every domain (validation to choose settings, test to report). Costs are wall
seconds divided by a **floor measured in the same invocation**, interleaved: floor, row, floor, row,
..., floor, each row divided by the faster of the two floors next to it (the floor is
``benchmarks/cost.py``'s: tokenize the calibration text, read the checkpoint, run the tokens through
every decoder layer once). One thread; the 1-minute load average is recorded around every run. One
invocation is one run (OUT.json is replaced, never resumed).

    OMP_NUM_THREADS=1 python benchmarks/eep_text.py --split validation --out docs/eep_text_validation
    OMP_NUM_THREADS=1 python benchmarks/eep_text.py --model src/moeshrink/testbed/data/moeshrink-tiny-ds3 \
        --keep 16 --split validation --out docs/eep_text_ds3_validation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost import _floor  # noqa: E402
from quality import PRUNE_KEYS, RECOVER_KEYS, parse_variant  # noqa: E402

from moeshrink.evaluate.suite import evaluate_model  # noqa: E402
from moeshrink.info import describe_model  # noqa: E402
from moeshrink.io.checkpoint import load_model  # noqa: E402
from moeshrink.pipeline import prune  # noqa: E402
from moeshrink.report.tables import markdown_table  # noqa: E402
from moeshrink.search import search  # noqa: E402
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir  # noqa: E402

# named search settings: search() keyword arguments over its defaults
SETTINGS: dict[str, dict] = {
    "default": {},
    "seeded by frequency only (the previous default)": {"init": ("frequency",)},
    "prune-only": {"merge_iterations": 0},
    "merge dropped columns only, sigma 0.05": {"merge_scope": "dropped", "sigma": 0.05},
    "patience 6": {"patience": 6},
    "fitness 16 windows": {"samples": 16},
    "fitness 32 windows": {"samples": 32},
    "with recovery": {"recover": True},
}


def _timed(run) -> tuple[dict, float]:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_1min": [load, os.getloadavg()[0]]}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=["validation", "test"], required=True)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the Mixtral testbed)")
    parser.add_argument("--domain", default="bible")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[
            "reap",
            "msmoe:router=logsumexp,reconstruct=true",
            "uncurl:router=logsumexp,reconstruct=true",
        ],
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="one-shot calibration sequences (and the floor's)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    model_dir = args.model or testbed_model_dir()
    calib = corpus_dir() / args.domain / "calib.jsonl"
    evaluate = dict(split=args.split, max_tokens=args.eval_tokens, speed=False, usage=False)
    floor_job = {
        "model": str(model_dir),
        "calib": str(calib),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "stream": False,
        "batch_size": 8,
    }
    data: dict = {
        "run_id": uuid.uuid4().hex[:12],
        "command": "OMP_NUM_THREADS=1 python benchmarks/eep_text.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread, {platform.platform()}",
        "settings": vars(args) | {"out": str(args.out)},
        "floors": [],
        "rows": {},
    }
    base = load_model(model_dir)
    data["baseline"] = _perplexity(base.model, base.tokenizer, evaluate)
    data["settings"] |= {
        "model": str(model_dir),
        "experts": max(describe_model(base.model, base.adapter).experts_per_layer),
    }
    del base

    def floor() -> None:
        timing, _ = _timed(_floor(floor_job))
        data["floors"].append(timing)
        print(f"[eep_text] floor {timing['seconds']:.2f}s load {timing['load_1min'][0]:.2f}", flush=True)

    floor()
    jobs = [("one-shot", m) for m in args.methods] + [("eep", s) for s in args.settings]
    for kind, name in jobs:
        key = f"{kind}: {name}"
        print(f"[eep_text] {key}", flush=True)
        if kind == "one-shot":
            method, options = parse_variant(name)
            extra = {k: options.pop(k) for k in PRUNE_KEYS if k in options}
            recover = {k: options.pop(k) for k in RECOVER_KEYS if k in options}
            if recover.pop("recover", False):  # e.g. reap:recover=true,recover_ridge=0.1
                extra["steps"] = [{"recover": {k.removeprefix("recover_"): v for k, v in recover.items()}}]
            timing, result = _timed(
                lambda method=method, options=options, extra=extra: prune(
                    model_dir,
                    method,
                    keep=args.keep,
                    calib=calib,
                    samples=args.samples,
                    seq_len=args.seq_len,
                    method_options=options,
                    progress=False,
                    **extra,
                )
            )
            info = {}
        else:
            timing, result = _timed(
                lambda name=name: search(
                    model_dir, calib=[calib], keep=args.keep, seed=args.seed, progress=False, **SETTINGS[name]
                )
            )
            run = result.plan.method_options["run"]
            info = {
                "evaluations": result.state.evaluations,
                "generations": run["generations"],
                "stopped": run["stopped"],
                "fitness": result.best.fitness.to_dict(),
                "merged_experts": sum(not e.is_plain_copy for lp in result.plan.layers for e in lp.experts),
                "search_seconds": result.seconds["search"],
            }
        row = timing | info
        row["perplexity"] = _perplexity(result.model, result.tokenizer, evaluate)
        del result
        data["rows"][key] = row
        floor()
        row["floor_seconds"] = min(f["seconds"] for f in data["floors"][-2:])
        row["cost_over_floor"] = row["seconds"] / row["floor_seconds"]
        print(
            f"[eep_text] {key}: {json.dumps({k: v for k, v in row.items() if k != 'perplexity'})}", flush=True
        )
        _write(args.out, data, started)
    _write(args.out, data, started)


def _perplexity(model, tokenizer, evaluate: dict) -> dict[str, float]:
    domains = evaluate_model(model, tokenizer, **evaluate)["domains"]
    return {d: r["perplexity"] for d, r in domains.items()}


def _ratio(row: dict, baseline: dict, domains: list[str]) -> float:
    return math.exp(sum(math.log(row[d] / baseline[d]) for d in domains) / len(domains))


def render(data: dict) -> str:
    s = data["settings"]
    others = [d for d in DOMAINS if d != s["domain"]]
    lines = [
        f"{Path(s.get('model', 'moeshrink-tiny')).name} {s.get('experts', 16)} -> {s['keep']} experts, calibration text: the {s['domain']} calib split; perplexity on "
        f"up to {s['eval_tokens']} tokens per domain of the **{s['split']}** split. Run {data['run_id']}, "
        f"{data['machine']}, {data['total_seconds']:.0f} s in all. Made by:",
        "",
        "    " + data["command"],
        "",
        "Unpruned perplexity: " + ", ".join(f"{d} {data['baseline'][d]:.2f}" for d in DOMAINS) + ".",
        "",
    ]
    rows = []
    for key, r in data["rows"].items():
        p = r["perplexity"]
        rows.append(
            [
                key,
                f"{p[s['domain']]:.2f}",
                f"{_ratio(p, data['baseline'], [s['domain']]):.3f}",
                f"{_ratio(p, data['baseline'], others):.3f}",
                str(r.get("evaluations", "-")),
                r.get("stopped", "-"),
                f"{r['seconds']:.1f}",
                f"{r['floor_seconds']:.2f}",
                f"{r['cost_over_floor']:.1f}x",
                f"{r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f}",
            ]
        )
    header = [
        "row",
        f"ppl {s['domain']}",
        "ratio (calibrated)",
        "ratio (others, geo)",
        "evaluations",
        "stopped",
        "wall s",
        "floor s",
        "cost / floor",
        "load",
    ]
    lines.append(markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def _write(out: Path, data: dict, started: float) -> None:
    data["total_seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))


if __name__ == "__main__":
    main()
