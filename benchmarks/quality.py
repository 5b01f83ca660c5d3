"""Quality benchmark: method x experts kept x calibration domain on the testbed.

For every calibration domain and budget, each method prunes the testbed (in memory), and the result
is evaluated on every domain's held-out text (perplexity; lm-eval multiple choice with --tasks).
``--split validation`` measures on the validation split (for choosing defaults and options),
``--split test`` (default) on the test split (for the numbers the docs report); one OUT holds one split.
Each row records its compression seconds, but the report shows no time: rows are measured hours apart
and resumed across runs, under whatever load the machine had; ``benchmarks/cost.py`` (docs/cost.md)
measures time against floors interleaved in one run. Results go to OUT.json (resumable) and OUT.md.

    python benchmarks/quality.py --out docs/quality
    python benchmarks/quality.py --out docs/defaults --split validation --methods ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from moeshrink.evaluate.suite import evaluate_model
from moeshrink.info import describe_model
from moeshrink.io.checkpoint import load_model
from moeshrink.methods import METHODS
from moeshrink.pipeline import prune
from moeshrink.report.tables import markdown_table
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir

# What a results file without a recorded split was measured on: the test split before the
# validation split was carved out of it (issue #13); today's validation + test documents.
PREVIOUS_TEST = "the previous test split (today's validation + test)"

TIME_NOTE = (
    "Time is not reported here (rows are measured hours apart, across resumed runs, on a shared machine): "
    "[cost.md](cost.md) times every method against a floor measured in the same run, interleaved with it."
)

# The calibration "domain" of general-purpose calibration: the four domains' calib splits together.
MIXED = "mixed"


def calib_files(calib_domain: str) -> list[Path]:
    """The calib split(s) of a calibration setting: one domain's, or every domain's for MIXED."""
    return [corpus_dir() / d / "calib.jsonl" for d in (DOMAINS if calib_domain == MIXED else [calib_domain])]


# Variant keys that are arguments of prune() (sparsity, budgets), not options of the method.
PRUNE_KEYS = (
    "total_sparsity",
    "sparsity",
    "sparsity_method",
    "sparsity_scope",
    "owl_lambda",
    "nm",
    "global_budget",
)
# Variant keys of the recover step: recover=true, then recover_ridge / recover_router / recover_down
# (its fields ridge, router, down), e.g. ``reap:recover=true,recover_router=false``.
RECOVER_KEYS = ("recover", "recover_ridge", "recover_router", "recover_down")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``uncurl:align=none,reconstruct=true`` -> ("uncurl", {"align": "none", "reconstruct": True});
    keys in PRUNE_KEYS (e.g. ``stun:total_sparsity=0.55``, ``none:sparsity_method=owl,total_sparsity=0.4``,
    ``reap:recover=true,recover_ridge=0.1``) are passed to prune() itself."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="methods or variants, e.g. uncurl:align=none,reconstruct=true",
    )
    parser.add_argument("--keep", type=int, nargs="+", default=[12, 8, 4])
    parser.add_argument(
        "--calib-domains",
        nargs="+",
        default=list(DOMAINS),
        help=f"each a calibration setting: one domain, or {MIXED!r} (the four domains' calib text together)",
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument(
        "--split",
        choices=["validation", "test"],
        default="test",
        help="held-out split measured: validation (choices) or test (reported numbers; default)",
    )
    parser.add_argument("--tasks", action="store_true", help="also run the lm-eval multiple-choice tasks")
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument(
        "--global-budget",
        action="store_true",
        help="share keep x layers over the layers by usage (rows: METHOD+global)",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json and stop")
    args = parser.parse_args()
    if args.render_only:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.with_suffix(".json").read_text())))
        return
    model_dir = args.model or testbed_model_dir()
    json_path = args.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    if "settings" in data and data["settings"].get("split", PREVIOUS_TEST) != args.split:
        sys.exit(
            f"{json_path} holds rows measured on {data['settings'].get('split', PREVIOUS_TEST)}, not "
            f"--split {args.split}: use another --out"
        )
    evaluate = dict(
        split=args.split,
        max_tokens=args.eval_tokens,
        speed=False,
        usage=False,
        tasks=[f"moeshrink_{d}" for d in DOMAINS] if args.tasks else None,
        task_limit=args.task_limit,
    )
    base = load_model(model_dir)
    if "baseline" not in data:
        data["baseline"] = evaluate_model(base.model, base.tokenizer, **evaluate)
        data["settings"] = vars(args) | {"out": str(args.out), "model": str(model_dir)}
        data["settings"]["experts"] = max(describe_model(base.model, base.adapter).experts_per_layer)
    del base
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    if command not in data.setdefault("commands", []):
        data["commands"].append(command)
    for calib_domain in args.calib_domains:
        for keep in args.keep:
            for method in args.methods:
                key = f"{method}{'+global' if args.global_budget else ''}|{keep}|{calib_domain}"
                if key in data["rows"]:
                    continue
                print(f"[quality] {key}", flush=True)
                load = os.getloadavg()[0]
                name, options = parse_variant(method)
                prune_kwargs = {k: options.pop(k) for k in PRUNE_KEYS if k in options}
                recover = {k: options.pop(k) for k in RECOVER_KEYS if k in options}
                if recover.pop("recover", False):
                    spec = {k.removeprefix("recover_"): v for k, v in recover.items()}
                    prune_kwargs["steps"] = [{"recover": spec}]
                result = prune(
                    model_dir,
                    name,
                    keep=None if name == "none" else keep,
                    calib=calib_files(calib_domain),
                    samples=args.samples,
                    seq_len=args.seq_len,
                    method_options=options,
                    progress=False,
                    **({"global_budget": args.global_budget} | prune_kwargs),
                )
                row = evaluate_model(result.model, result.tokenizer, **evaluate)
                row["compress_seconds"] = result.seconds["compress"]
                # the 1-minute load average at the start of the prune and after the evaluation
                row["load_1min"] = [load, os.getloadavg()[0]]
                row["experts_per_layer_after"] = result.after.experts_per_layer
                row["method_details"] = [lp.details for lp in result.plan.layers if lp.details]
                if result.plan.recovery:
                    row["recovery"] = result.plan.recovery
                if result.plan.sparsity:
                    row["sparsity"] = {
                        k: v for k, v in result.plan.sparsity.items() if k != "dense_layers"
                    } | {
                        "expert_fraction": result.sparsity.expert_fraction,
                        "fraction": result.sparsity.fraction,
                    }
                data["rows"][key] = row
                json_path.write_text(json.dumps(data, indent=1) + "\n")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(data))
    print(f"wrote {json_path} and {args.out.with_suffix('.md')}")


def _render_selective(rows: list[tuple[str, dict]]) -> list[str]:
    """STUN's selective reconstruction: how many clusters each row reconstructed or kept as their
    closest expert, and the mean criterion (error relative to the cluster's output energy)."""
    table = []
    for key, r in rows:
        records = [c for d in r["method_details"] for c in d.get("selective", [])]
        rebuilt = [c for c in records if c["choice"] == "reconstruct"]
        used = [c for c in records if c["keep"]["error"] + c["reconstruct"]["error"] > 0] or [None]
        means = [sum(c[part]["error"] for c in used if c) / len(used) for part in ("keep", "reconstruct")]
        method, keep, calib = key.split("|")
        table.append(
            [method, keep, calib, str(len(rebuilt)), str(len(records) - len(rebuilt))]
            + [f"{m:.3f}" for m in means]
        )
    header = [
        "method",
        "experts kept",
        "calibrated on",
        "clusters reconstructed",
        "kept as closest expert",
        "mean error if kept",
        "mean error if reconstructed",
    ]
    return [
        "## STUN selective reconstruction: choices (all layers)",
        "",
        "Errors are the criterion's (docs/stun_selective.md), relative to each cluster's output on the calibration "
        "tokens, averaged over the clusters the calibration tokens reach (an idle cluster's are 0 either way: "
        "it is reconstructed).",
        "",
        markdown_table(header, table),
        "",
    ]


def render(data: dict) -> str:
    base = data["baseline"]
    domains = list(base["domains"])
    settings = data["settings"]
    commands = "\n".join(f"    {c}" for c in data.get("commands", []))
    lines = [
        "# Quality benchmark on the testbed",
        "",
        f"Model `{Path(settings['model']).name}`, {settings['samples']} x {settings['seq_len']} calibration "
        f"tokens from one domain's calib split, perplexity on up to {settings['eval_tokens']} held-out tokens "
        f"per domain; held-out split: **{settings.get('split', PREVIOUS_TEST)}**; on one machine (2 CPU cores). "
        "Made by (each run adds its rows to the JSON):",
        "",
        commands,
        "",
        *(f"{note}\n" for note in data.get("notes", [])),
        "Unpruned perplexity: "
        + ", ".join(f"{d} {base['domains'][d]['perplexity']:.2f}" for d in domains)
        + ".",
        "",
    ]
    rows = {k: r for k, r in data["rows"].items() if "total_sparsity" not in r.get("sparsity", {})}
    sparse_rows = {k: r for k, r in data["rows"].items() if k not in rows}
    keeps = sorted({int(k.split("|")[1]) for k in rows}, reverse=True)
    methods = list(dict.fromkeys(k.split("|")[0] for k in rows))
    calib_domains = list(dict.fromkeys(k.split("|")[2] for k in rows))
    lines += [
        "## Summary: perplexity ratio to the unpruned model (geometric mean over calibration domains)",
        "",
    ]
    header = [
        "experts kept",
        "method",
        "on the calibrated domain",
        "on the other domains",
    ]
    table = []
    for keep in keeps:
        for method in methods:
            own, other = [], []
            for c in calib_domains:
                r = rows.get(f"{method}|{keep}|{c}")
                if r is None:
                    continue
                for d in domains:
                    ratio = math.log(r["domains"][d]["perplexity"] / base["domains"][d]["perplexity"])
                    (own if d == c else other).append(ratio)
            if own or other:  # own is empty for mixed calibration: every domain was in it
                table.append(
                    [
                        str(keep),
                        method,
                        f"{math.exp(sum(own) / len(own)):.3f}" if own else "-",
                        f"{math.exp(sum(other) / len(other)):.3f}",
                    ]
                )
    lines += [markdown_table(header, table), "", TIME_NOTE, ""]
    if sparse_rows:
        lines += _render_total_sparsity(sparse_rows, base, domains)
    searched = [
        (k, r) for k, r in rows.items() if r.get("method_details") and "search" in r["method_details"][0]
    ]
    selective = [
        (k, r) for k, r in rows.items() if any("selective" in d for d in r.get("method_details") or [])
    ]
    if selective:
        lines += _render_selective(selective)
    if searched:
        lines += [
            "## Subset search cost (per layer)",
            "",
            "Subsets each layer's search evaluated; its time is in [cost.md](cost.md).",
            "",
            markdown_table(
                [
                    "method",
                    "experts kept",
                    "calibrated on",
                    "search",
                    "subsets evaluated",
                    "of possible",
                ],
                [
                    [
                        k.split("|")[0],
                        k.split("|")[1],
                        k.split("|")[2],
                        r["method_details"][0]["search"],
                        str(r["method_details"][0]["subsets_evaluated"]),
                        str(r["method_details"][0]["subsets_possible"]),
                    ]
                    for k, r in searched
                ],
            ),
            "",
        ]
    for keep in keeps:
        experts = settings.get("experts", 16)  # files written before it was recorded: the Mixtral testbed
        lines += [f"## {experts} -> {keep} experts: perplexity per domain (calibrated domain in bold)", ""]
        header = ["method", "calibrated on"] + domains
        table = []
        for c in calib_domains:
            for method in methods:
                r = rows.get(f"{method}|{keep}|{c}")
                if r is None:
                    continue
                cells = []
                for d in domains:
                    cell = f"{r['domains'][d]['perplexity']:.2f}"
                    cells.append(f"**{cell}**" if d == c else cell)
                if "tasks" in r:
                    cells = [
                        f"{cell} / {r['tasks'][f'moeshrink_{d}']['acc']:.2f}"
                        for cell, d in zip(cells, domains, strict=True)
                    ]
                table.append([method, c, *cells])
        lines += [markdown_table(header, table), ""]
    return "\n".join(lines)


def _log_ratios(
    row: dict, base: dict, domains: list[str], calibrated: str
) -> tuple[list[float], list[float]]:
    own, other = [], []
    for d in domains:
        ratio = math.log(row["domains"][d]["perplexity"] / base["domains"][d]["perplexity"])
        (own if d == calibrated else other).append(ratio)
    return own, other


def _sparse_label(variant: str, sparsity: dict) -> str:
    """``owl alone (owl_lambda=0.02)``, ``stun (mode=average,reconstruct=true) + wanda``: the method and
    the options the variant names, other than the budget and the sparsity method (in the columns)."""
    name, _, rest = variant.partition(":")
    shown = [
        o
        for o in filter(None, rest.split(","))
        if o.split("=")[0] not in ("total_sparsity", "sparsity_method")
    ]
    options = f" ({','.join(shown)})" if shown else ""
    if name == "none":
        return f"{sparsity['method']} alone{options}"
    return f"{name}{options} + {sparsity['method']}"


def _render_total_sparsity(rows: dict, base: dict, domains: list[str]) -> list[str]:
    """Rows pruned to a total sparsity (STUN vs Wanda vs OWL alone): one line per (total, method, keep)."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for key, row in rows.items():
        method, keep, calibrated = key.split("|")
        groups.setdefault((row["sparsity"]["total_sparsity"], method, int(keep)), []).append(
            (calibrated, row)
        )
    table = []
    for (total, method, keep), members in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][2], g[0][1])):
        own, other = [], []
        for calibrated, row in members:
            o, t = _log_ratios(row, base, domains, calibrated)
            own += o
            other += t
        first = members[0][1]["sparsity"]
        table.append(
            [
                f"{total:.0%}",
                _sparse_label(method, first),
                str(keep),
                f"{first['removed_by_experts']:.0%}",
                f"{first['inside_sparsity']:.1%}",
                f"{sum(r['sparsity']['total_sparsity_achieved'] for _, r in members) / len(members):.2%}",
                f"{math.exp(sum(own) / len(own)):.3f}",
                f"{math.exp(sum(other) / len(other)):.3f}",
                str(len(members)),
            ]
        )
    header = [
        "total sparsity",
        "method",
        "experts kept",
        "removed as experts",
        "zeroed inside",
        "reached",
        "ppl ratio, calibrated domain",
        "other domains",
        "calibration domains",
    ]
    return [
        "## Equal total sparsity: STUN vs Wanda alone vs OWL alone",
        "",
        "Total sparsity = share of the original routed-expert weights gone, whether removed with their expert "
        "or zeroed inside a surviving one. Perplexity ratio to the unpruned model, geometric mean over "
        "calibration domains.",
        "",
        markdown_table(header, table),
        "",
    ]


if __name__ == "__main__":
    main()
