"""``moeshrink demo``: the main job end to end on the shipped testbed, with a comparison report.

Calibrate on one domain's calibration split, prune 16 -> 8 experts with every method, evaluate
each against the unpruned model on every domain (perplexity, lm-eval multiple choice, speed), and
write ``report.md``, ``report.json`` and PNG plots, plus each pruned checkpoint under ``models/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moeshrink.evaluate.suite import evaluate_model
from moeshrink.extras import require_extra
from moeshrink.io.checkpoint import load_model
from moeshrink.io.export import atomic_directory
from moeshrink.methods import METHODS
from moeshrink.pipeline import prune
from moeshrink.plan import LayerPlan
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir


def local_task_names(domains: Sequence[str]) -> list[str]:
    return [f"moeshrink_{d}" for d in sorted(domains)]


def describe_layer(plan: LayerPlan) -> str:
    """``0 2+7 5 ...``: the old experts behind each new one (``+`` joins merged experts)."""
    return " ".join("+".join(str(s) for s in e.sources) for e in plan.experts)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    model: str | Path | None = None,
    calib_domain: str = "wiki",
    keep: int = 8,
    methods: Sequence[str] | None = None,
    samples: int = 64,
    seq_len: int = 256,
    eval_tokens: int = 16384,
    task_limit: int | None = 100,
    overwrite: bool = True,
    progress: bool = True,
) -> Path:
    """Run the demo and return the report path."""
    require_extra("lm_eval", "the demo (its multiple-choice tasks)")  # before an hour of work, not after
    require_extra("matplotlib", "the demo (its plots)")
    from moeshrink.report.report import write_report

    model = Path(model) if model else testbed_model_dir()
    methods = list(methods or METHODS)
    calib = corpus_dir() / calib_domain / "calib.jsonl"
    tasks = local_task_names(DOMAINS)
    evaluate = dict(tasks=tasks, task_limit=task_limit, max_tokens=eval_tokens, seq_len=seq_len)
    results, details = {}, {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _say(progress, f"evaluating the unpruned model {model}")
        base = load_model(model)
        results["unpruned"] = evaluate_model(base.model, base.tokenizer, **evaluate)
        del base
        for method in methods:
            _say(
                progress,
                f"pruning with {method}: {results['unpruned']['experts_per_layer'][0]} -> {keep} experts",
            )
            run = prune(
                model,
                method,
                keep=keep,
                calib=calib,
                output=tmp / "models" / method,
                samples=samples,
                seq_len=seq_len,
                progress=progress,
            )
            # calibrate + compress; writing and verifying the output are not part of the method's cost
            prune_seconds = run.seconds["total"] - run.seconds.get("export", 0.0)
            results[method] = evaluate_model(run.model, run.tokenizer, **evaluate)
            details[method] = {
                "prune seconds": f"{prune_seconds:.1f}",
                f"experts of layer {run.plan.layers[0].layer} (old indices)": describe_layer(
                    run.plan.layers[0]
                ),
            }
        intro = (
            f"Testbed `{model.name}`, calibrated on **{calib_domain}** ({samples} x {seq_len} tokens from "
            f"`{calib.parent.name}/{calib.name}`), pruned to {keep} experts per layer by each method; "
            f"perplexity on up to {eval_tokens} held-out tokens per domain; multiple-choice tasks "
            f"{'limited to ' + str(task_limit) + ' items each' if task_limit else 'in full'}. "
            f"Pruned checkpoints are in `models/`."
        )
        write_report(
            tmp,
            results,
            baseline="unpruned",
            title="moeshrink demo",
            intro=intro,
            calib_domain=calib_domain,
            details=details,
        )
    _say(progress, f"wrote {Path(out) / 'report.md'}")
    return Path(out) / "report.md"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[demo] {message}", flush=True)
