"""EEP benchmark on the testbed: prune-only and prune+merge search vs frequency and REAP.

One domain's multiple-choice task: the search scores candidates on its first ``--items`` items and
every model is then scored on held-out items 100-199 of the same task (the lm-eval ``acc`` rule,
computed in-process; the unpruned model is also run through lm-eval as a check) and by perplexity on
every domain's held-out text. Also: the folded router's error against the exact transfer, the speed
of top-2 vs top-1, evaluations per second and the search time relative to one forward pass over the
fitness data. Results go to OUT.json and OUT.md.

    OMP_NUM_THREADS=1 python benchmarks/eep.py --out docs/eep
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeshrink.evaluate.perplexity import domain_windows, perplexity
from moeshrink.evaluate.speed import measure_speed
from moeshrink.evaluate.tasks import run_lm_eval
from moeshrink.io.checkpoint import load_model
from moeshrink.pipeline import apply_plan, prune
from moeshrink.plan import ModelPlan
from moeshrink.report.tables import markdown_table
from moeshrink.search import search
from moeshrink.search.eep import fold_error
from moeshrink.search.fitness import TaskFitness, WorkingCopy, build_task_data, read_items, resolve_task
from moeshrink.surgery import set_top_k
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir

HELD_OUT = (100, 200)  # task items never seen by the search


def task_accuracy(model, adapter, data) -> dict[str, float]:
    """Held-out multiple-choice accuracy and gold-continuation loss of the model as it is."""
    scorer = TaskFitness(model, adapter, data, batch_size=32)
    fit = scorer.score(scorer.sequence_logprobs())
    return {"accuracy": fit.accuracy, "gold_nll": fit.nll}


def domain_perplexity(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {d: perplexity(model, w, batch_size=8)["perplexity"] for d, w in windows.items()}


def evaluate(model, adapter, heldout, windows) -> dict:
    return task_accuracy(model, adapter, heldout) | {"perplexity": domain_perplexity(model, windows)}


def forward_floor(model, ids: torch.Tensor, batch_size: int = 32) -> float:
    """Seconds for one forward pass of the unchanged model over the fitness sequences (best of 2)."""
    best = math.inf
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size])
            best = min(best, time.perf_counter() - t)
    return best


def run_eep(args, model_dir: Path, keep: int, top_k: int | None, heldout, windows) -> dict:
    t = time.perf_counter()
    result = search(
        model_dir,
        args.task,
        keep=keep,
        top_k=top_k,
        items=args.items,
        population=args.population,
        elite=args.elite,
        prune_iterations=args.prune_iterations,
        merge_iterations=args.merge_iterations,
        seed=args.seed,
        objective=args.objective,
        init=args.init,
        merge_scope=args.merge_scope,
        sigma=args.sigma,
        active_experts=args.active_experts,
        progress=False,
    )
    wall = time.perf_counter() - t
    state = result.state
    adapter = load_model(model_dir).adapter
    row = {
        "search": {
            "evaluations": state.evaluations,
            "search_seconds": state.seconds,
            "wall_seconds": wall,
            "evaluations_per_second": result.evaluations_per_second,
            "fitness_prune": result.best_prune.fitness.to_dict(),
            "fitness_merge": result.best.fitness.to_dict(),
            "merged_experts": sum(not e.is_plain_copy for lp in result.plan.layers for e in lp.experts),
            "history": state.history,
        },
        "prune+merge": evaluate(result.model, adapter, heldout, windows),
        "plan": result.plan.model_dump(mode="json"),
    }
    pruned = apply_plan(model_dir, result.prune_plan)
    row["prune"] = evaluate(pruned.model, adapter, heldout, windows)
    exact = load_model(model_dir)
    working = WorkingCopy(exact.model, exact.adapter)
    k = result.plan.top_k
    row["fold_error"] = fold_error(result.best, result.coefficients, working, windows[args.domain][:16], k)
    with working.applied(result.best.merge, result.best.transfer, result.best.routing(k)):
        row["prune+merge exact router"] = evaluate(exact.model, adapter, heldout, windows)
    row["_model"] = result.model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/eep"))
    parser.add_argument("--domain", default="bible")
    parser.add_argument("--keep", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--items", type=int, default=64, help="fitness items (the task's first ones)")
    parser.add_argument("--population", type=int, default=6)
    parser.add_argument("--elite", type=int, default=2)
    parser.add_argument("--prune-iterations", type=int, default=4)
    parser.add_argument("--merge-iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", choices=["accuracy", "loss", "text"], default="accuracy")
    parser.add_argument("--merge-scope", choices=["all", "dropped"], default="all")
    parser.add_argument("--sigma", type=float, default=0.1, help="merge-stage mutation size")
    parser.add_argument("--init", nargs="+", default=["frequency"], help="scoring methods seeding the search")
    parser.add_argument("--no-top1", action="store_true", help="skip the top-1 search and the speed runs")
    parser.add_argument(
        "--active-experts",
        type=float,
        help="also search each layer's top-k at this mean (rows ~active=X, with their speed)",
    )
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences for the baselines")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--split",
        choices=["validation", "test"],
        default="test",
        help="held-out text for perplexity: validation to choose settings, test to report (the task's "
        "held-out items come from the shipped tasks, built from test)",
    )
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain")
    parser.add_argument("--render-only", action="store_true", help="rewrite OUT.md from OUT.json and stop")
    parser.add_argument(
        "--speed-only",
        metavar="ROW",
        help="re-measure speed (best of 5): unpruned and ROW's saved plan (e.g. 'eep:text@frequency+reap|8'), "
        "each with top-2 and top-1; keeps the rest of OUT.json",
    )
    parser.add_argument(
        "--speed-compare",
        nargs="+",
        metavar="ROW",
        help="speed of saved rows' plans as exported (their own top-k), measured in turn, best of 9; keeps the "
        "rest of OUT.json",
    )
    args = parser.parse_args()
    if args.render_only:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.with_suffix(".json").read_text())))
        return
    if args.speed_only:
        torch.set_num_threads(1)
        remeasure_speed(args.out, args.speed_only)
        return
    if args.speed_compare:
        torch.set_num_threads(1)
        compare_speed(args.out, args.speed_compare)
        return
    args.task = f"moeshrink_{args.domain}"
    torch.set_num_threads(1)
    start = time.perf_counter()
    model_dir = testbed_model_dir()
    base = load_model(model_dir)
    adapter, tokenizer = base.adapter, base.tokenizer
    task_path = resolve_task(args.task)
    heldout = build_task_data(tokenizer, read_items(task_path, *HELD_OUT))
    fitness_data = build_task_data(tokenizer, read_items(task_path, 0, args.items))
    windows = {
        d: domain_windows(tokenizer, corpus_dir() / d / f"{args.split}.jsonl", args.seq_len, args.eval_tokens)
        for d in DOMAINS
    }
    json_path = args.out.with_suffix(".json")
    data: dict = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}, "commands": []}
    if data["rows"] and data.get("settings", {}).get("split", "test") != args.split:
        sys.exit(
            f"{json_path} holds rows measured on another split than --split {args.split}: use another --out"
        )
    data["commands"].append("OMP_NUM_THREADS=1 python benchmarks/eep.py " + " ".join(sys.argv[1:]))
    if "baseline" not in data:
        data["settings"] = {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "objective", "no_top1", "init", "merge_scope", "sigma")
        }
        data["settings"]["held_out_items"] = list(HELD_OUT)
        data["machine"] = (
            f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {platform.platform()}"
        )
        data["fitness_data"] = fitness_data.info
        data["baseline"] = evaluate(base.model, adapter, heldout, windows)
        with tempfile.TemporaryDirectory() as tmp:  # the in-process scorer against lm-eval, same items
            items = read_items(task_path, *HELD_OUT)
            path = Path(tmp) / "heldout.jsonl"
            path.write_text("".join(json.dumps(i) + "\n" for i in items))
            data["baseline"]["lm_eval_acc"] = run_lm_eval(base.model, tokenizer, [str(path)])[path.stem][
                "acc"
            ]
        data["floor_seconds"] = forward_floor(base.model, fitness_data.input_ids)
    # every invocation measures its own floor: its rows divide by it, not by an earlier run's
    floor_seconds = forward_floor(base.model, fitness_data.input_ids)
    data.setdefault("total_seconds", 0.0)
    eep = "eep" + ("" if args.objective == "accuracy" else f":{args.objective}")
    eep += "" if args.init == ["frequency"] else "@" + "+".join(args.init)
    eep += "" if args.merge_scope == "all" else f"~{args.merge_scope}"
    eep += "" if args.sigma == 0.1 else f"~sigma={args.sigma}"
    eep += "" if args.active_experts is None else f"~active={args.active_experts:g}"
    print(
        f"[eep] baseline {data['baseline']['accuracy']:.3f}, floor {data['floor_seconds']:.2f}s", flush=True
    )

    calib = corpus_dir() / args.domain / "calib.jsonl"
    models = {}
    for keep in args.keep:
        for method in ("frequency", "reap"):
            if f"{method}|{keep}" in data["rows"]:
                continue
            t = time.perf_counter()
            result = prune(
                model_dir,
                method,
                keep=keep,
                calib=calib,
                samples=args.samples,
                seq_len=args.seq_len,
                progress=False,
            )
            seconds = time.perf_counter() - t
            data["rows"][f"{method}|{keep}"] = evaluate(result.model, adapter, heldout, windows) | {
                "seconds": seconds
            }
        if f"{eep}|{keep}" in data["rows"]:
            continue
        row = run_eep(args, model_dir, keep, None, heldout, windows)
        row["search"]["floor_seconds"] = floor_seconds
        models[keep] = row.pop("_model")
        if args.active_experts is not None:
            row["active_top_k"] = {str(i): k for i, k in sorted(row_top_k(row).items())}
            row["speed"] = measure_speed(models[keep])
        data["rows"][f"{eep}|{keep}"] = row
        print(f"[eep] keep {keep}: {json.dumps(row['search'], default=str)[:300]}", flush=True)

    if args.no_top1:
        _write(args.out, data, start)
        return
    # fewer active experts: the searched 8-expert model with top-1 (a search of its own) vs top-2
    top1 = run_eep(args, model_dir, args.keep[0], 1, heldout, windows)
    top1_model = top1.pop("_model")
    data["rows"][f"{eep}|{args.keep[0]}|top1"] = top1
    base_top1 = prune(model_dir, "none", top_k=1, progress=False)
    data["rows"]["unpruned|16|top1"] = evaluate(base_top1.model, adapter, heldout, windows)
    speed = {}
    for name, model in (
        ("unpruned top-2", base.model),
        ("unpruned top-1", base_top1.model),
        (f"eep {args.keep[0]} top-2", models[args.keep[0]]),
        (f"eep {args.keep[0]} top-1", top1_model),
    ):
        speed[name] = measure_speed(model)
    data["speed"] = speed
    _write(args.out, data, start)


def row_top_k(row: dict) -> dict[int, int]:
    """Each MoE layer's top-k in a row's plan."""
    plan = row["plan"]
    return {lp["layer"]: lp.get("top_k") or plan["top_k"] for lp in plan["layers"]}


def remeasure_speed(out: Path, row: str) -> None:
    """Speed of the unpruned testbed and of a searched plan, each with its top-k and with top-1."""
    data = json.loads(out.with_suffix(".json").read_text())
    plan = ModelPlan.model_validate(data["rows"][row]["plan"])
    model_dir, start = testbed_model_dir(), time.perf_counter()
    base = load_model(model_dir)
    speed = {}
    for name, model in (("unpruned", base.model), (_run(row), apply_plan(model_dir, plan).model)):
        for k in (2, 1):
            for layer in base.adapter.moe_layers(model):
                set_top_k(layer, k)
            speed[f"{name}, top-{k}"] = measure_speed(model, repeats=5)
    data["speed"] = speed
    data["speed_command"] = "OMP_NUM_THREADS=1 python benchmarks/eep.py " + " ".join(sys.argv[1:])
    _write(out, data, start)


def compare_speed(out: Path, rows: list[str]) -> None:
    """Speed of several rows' exported models (each with its own, possibly per-layer, top-k), measured
    in turn three times so that the machine's load weighs on all of them alike."""
    start = time.perf_counter()
    data = json.loads(out.with_suffix(".json").read_text())
    models = {
        row: apply_plan(testbed_model_dir(), ModelPlan.model_validate(data["rows"][row]["plan"])).model
        for row in rows
    }
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(3):
        for row, model in models.items():
            runs[row].append(measure_speed(model, repeats=3))
    data["speed_compare"] = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/eep.py " + " ".join(sys.argv[1:]),
        "rows": {
            row: {
                "top_k": {str(i): k for i, k in row_top_k(data["rows"][row]).items()},
                "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in found),
                "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in found),
            }
            for row, found in runs.items()
        },
    }
    _write(out, data, start)


def _write(out: Path, data: dict, start: float) -> None:
    data["total_seconds"] += time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(f"[eep] wrote {out}.md ({data['total_seconds']:.0f}s in all runs)", flush=True)


def _label(method: str) -> str:
    method, *merge = method.split("~")
    method, _, init = method.partition("@")
    seeded = f", seeded by {init.replace('+', ' + ')}" if init else ""
    merging = "".join(
        ", top-k per layer searched at a mean of " + m.partition("=")[2]
        if m.startswith("active=")
        else ", merge " + m.replace("dropped", "dropped columns only")
        for m in merge
    )
    return f"EEP ({method.partition(':')[2] or 'accuracy'} fitness{seeded}{merging})"


def _run(key: str) -> str:
    method, keep, *rest = key.split("|")
    return f"{_label(method)}, {keep} kept" + (", top-1" if rest else "")


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def render(data: dict) -> str:
    s = data["settings"]
    domain, base = s["domain"], data["baseline"]
    others = [d for d in base["perplexity"] if d != domain]

    def cells(ev: dict) -> list[str]:
        ppl = ev["perplexity"]
        other = math.exp(sum(math.log(ppl[d]) for d in others) / len(others))
        return [_fmt(ev["accuracy"]), _fmt(ev["gold_nll"]), _fmt(ppl[domain], 2), _fmt(other, 2)]

    header = [
        "experts kept",
        "top-k",
        "method",
        "held-out acc",
        "gold nll",
        f"ppl {domain}",
        "ppl others (geo)",
        "cost",
    ]
    rows = [["16", "2", "unpruned", *cells(base), "-"]]
    for key, row in data["rows"].items():
        method, keep, *rest = key.split("|")
        k = "1" if rest else "2"
        if "active_top_k" in row:
            k = "/".join(str(v) for v in row["active_top_k"].values()) + " (by layer)"
        if method.startswith("eep"):
            sr, name = row["search"], _label(method)
            cost = f"search {sr['search_seconds']:.0f}s, {sr['evaluations']} evals"
            rows.append([keep, k, f"{name} prune-only", *cells(row["prune"]), cost])
            rows.append([keep, k, f"{name} prune+merge (exported router)", *cells(row["prune+merge"]), cost])
            rows.append(
                [
                    keep,
                    k,
                    f"{name} prune+merge (exact transfer)",
                    *cells(row["prune+merge exact router"]),
                    "-",
                ]
            )
        elif method == "unpruned":
            rows.append([keep, k, "unpruned", *cells(row), "-"])
        else:
            rows.append([keep, k, method, *cells(row), f"{row['seconds']:.0f}s"])
    rows.sort(
        key=lambda r: (-max(int(k) for k in r[1].split()[0].split("/")), -int(r[0]))
    )  # stable: methods keep their order per budget

    search_rows = []
    for key, row in data["rows"].items():
        if not key.startswith("eep"):
            continue
        sr = row["search"]
        search_rows.append(
            [
                _run(key),
                str(sr["evaluations"]),
                _fmt(sr["search_seconds"], 1),
                _fmt(sr["wall_seconds"], 1),
                _fmt(sr["evaluations_per_second"], 2),
                _fmt(sr["search_seconds"] / sr.get("floor_seconds", data["floor_seconds"]), 1),
                f"{sr['fitness_prune']['accuracy']:.3f} -> {sr['fitness_merge']['accuracy']:.3f}",
                f"{sr['fitness_prune']['nll']:.3f} -> {sr['fitness_merge']['nll']:.3f}",
                str(sr["merged_experts"]),
            ]
        )
    fold_rows = []
    for key, row in data["rows"].items():
        if key.startswith("eep"):
            for layer, e in row["fold_error"].items():
                fold_rows.append(
                    [
                        _run(key),
                        str(layer),
                        _fmt(e["same_experts"]),
                        _fmt(e["total_variation"]),
                    ]
                )
    speed = data.get("speed") or {}  # absent when every run had --no-top1
    names = list(speed)
    speed_rows = [
        [
            n,
            f"{speed[n]['prefill_tokens_per_s']:.0f}",
            f"{speed[n]['decode_tokens_per_s']:.0f}",
            f"{speed[n]['parameter_bytes'] / 2**20:.1f}",
        ]
        for n in names
    ]
    ratio = (
        {
            pair: (
                speed[pair[1]]["prefill_tokens_per_s"] / speed[pair[0]]["prefill_tokens_per_s"],
                speed[pair[1]]["decode_tokens_per_s"] / speed[pair[0]]["decode_tokens_per_s"],
            )
            for pair in ((names[0], names[1]), (names[2], names[3]), (names[0], names[3]))
        }
        if len(names) >= 4
        else {}
    )
    lines = [
        "# EEP on the testbed",
        "",
        f"Model `moeshrink-tiny` (16 experts, top-2). Task `{s['task']}`: the search scores candidates on its "
        f"first {s['items']} items (multiple choice, 4 choices); *accuracy fitness* is their accuracy (the gold "
        "continuations' loss breaks ties), *loss fitness* the gold continuations' mean token loss, *text fitness* the mean token loss over the "
        "items' whole text (contexts and gold continuations). Every model "
        f"is then scored on held-out items {s['held_out_items'][0]}-"
        f"{s['held_out_items'][1] - 1} (lm-eval's `acc` rule computed in-process; for the unpruned model lm-eval "
        f"itself gives {base['lm_eval_acc']:.3f}, the in-process scorer {base['accuracy']:.3f}) and by perplexity "
        f"on {s['eval_tokens']} held-out tokens per domain. Frequency and REAP calibrate on {s['samples']} x "
        f"{s['seq_len']} tokens of the {domain} calib split.",
        "",
        f"Search budget per run: population {s['population']} (elite {s['elite']}), {s['prune_iterations']} prune + "
        f"{s['merge_iterations']} merge generations, seed {s['seed']}; the prune population starts from the "
        "experts frequency (and, where named, other scoring methods) keeps on the fitness items' text, plus random "
        "subsets (the paper used 40 + 160 iterations on "
        "Mixtral). Machine: "
        + data["machine"]
        + f". All runs together: {data['total_seconds'] / 60:.1f} min (the machine's 2 cores were shared with other jobs).",
        "",
        *("    " + c for c in data["commands"]),
        "",
        "## Quality",
        "",
        markdown_table(header, rows),
        "",
        "## Search cost",
        "",
        f"One forward pass of the unpruned model over the fitness data ({data['fitness_data']['samples']} "
        f"sequences, {data['fitness_data']['seq_len']} positions padded) takes {data['floor_seconds']:.2f}s. "
        "An evaluation reuses the cached inputs of the first MoE layer and computes the language-model head only "
        "at continuation positions.",
        "",
        markdown_table(
            [
                "run (kept)",
                "evaluations",
                "search s",
                "wall s (load, counts, fold)",
                "evals/s",
                "search / forward pass",
                "fitness acc prune -> merge",
                "fitness gold nll prune -> merge",
                "merged experts (all layers)",
            ],
            search_rows,
        ),
        "",
        "## Router: folded standard router vs the exact transfer",
        "",
        f"Per MoE layer, on {domain} held-out windows run through the exact-transfer model (same layer inputs for "
        "both routers): share of tokens whose chosen experts are the same, and mean total variation distance "
        "between the two routing-weight vectors. One-hot rows fold exactly (0 error).",
        "",
        markdown_table(["run (kept)", "layer", "same experts", "total variation"], fold_rows),
        "",
    ]
    if speed_rows:
        lines += [
            "## Speed: top-2 vs top-1",
            "",
            "`evaluate/speed.py` (batch 4 x 128-token prompts, 32 greedy new tokens), one thread, "
            + (
                "best of 5; a searched model's top-1 row is the same model with its top-k set to 1. Measured with:\n\n    "
                + data["speed_command"]
                if "speed_command" in data
                else "best of 3; the eep top-1 model comes from a search run with top-1."
            ),
            "",
            markdown_table(["model", "prefill tok/s", "decode tok/s", "parameters MiB"], speed_rows),
            "",
        ]
    for (a, b), (p, d) in ratio.items():
        lines.append(f"- {b} vs {a}: prefill x{p:.2f}, decode x{d:.2f}")
    lines.append("")
    if "speed_compare" in data:
        compared = data["speed_compare"]["rows"]
        lines += [
            "## Speed: searched top-k per layer",
            "",
            "The exported models as they load with `moeshrink.io.checkpoint.load_model` (each layer its own "
            "top-k), measured in turn, best of 9. Measured with:",
            "",
            "    " + data["speed_compare"]["command"],
            "",
            markdown_table(
                ["run", "top-k by layer", "prefill tok/s", "decode tok/s"],
                [
                    [
                        _run(row),
                        "/".join(str(k) for k in r["top_k"].values()),
                        f"{r['prefill_tokens_per_s']:.0f}",
                        f"{r['decode_tokens_per_s']:.0f}",
                    ]
                    for row, r in compared.items()
                ],
            ),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
