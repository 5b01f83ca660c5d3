"""``moeshrink demo``: the main job end to end on the shipped testbed, with a comparison report.

Calibrate on one domain's calibration split, prune 16 -> 8 experts with every method, evaluate
each against the unpruned model on every domain (perplexity, lm-eval multiple choice, speed), and
write ``report.md``, ``report.json`` and PNG plots, plus each pruned checkpoint under ``models/``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from moeshrink.evaluate.suite import evaluate_model
from moeshrink.extras import require_extra
from moeshrink.io.checkpoint import load_model
from moeshrink.io.export import atomic_directory
from moeshrink.job import PruneResult, verify_by_default
from moeshrink.methods import METHODS
from moeshrink.pipeline import prune
from moeshrink.plan import LayerPlan, ModelPlan
from moeshrink.report.model_card import model_card
from moeshrink.runtime import compute_dtype, keep_freed_memory
from moeshrink.testbed.paths import DOMAINS, corpus_dir, testbed_model_dir
from moeshrink.verify import verify_before_commit


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
    evaluate = dict(evaluate, progress=progress)
    results, details = {}, {}
    clock = _Clock(progress)
    verify = verify_by_default()
    # Each output is verified in a fresh process (as prune does before it commits one) while this
    # process evaluates the model: the fresh process spends most of its time importing torch and
    # transformers, one core's work, so the two overlap. The demo's directory is committed only after
    # every verification has passed.
    with (
        keep_freed_memory(),  # see moeshrink.runtime: a third of the demo's CPU time went to page faults
        atomic_directory(out, overwrite=overwrite) as tmp,
        ThreadPoolExecutor(max_workers=1) as verifier,
    ):
        with clock("evaluating the unpruned model", f" {model}"):
            base = load_model(model)
            base.model.to(compute_dtype(base.model.dtype))  # exact upcast; see compute_dtype
            results["unpruned"] = evaluate_model(base.model, base.tokenizer, **evaluate)
            del base
        for method in methods:
            experts = results["unpruned"]["experts_per_layer"][0]
            with clock(f"pruning with {method}", f": {experts} -> {keep} experts"):
                run = prune(
                    model,
                    method,
                    keep=keep,
                    calib=calib,
                    output=tmp / "models" / method,
                    samples=samples,
                    seq_len=seq_len,
                    progress=progress,
                    verify=False,  # below, beside the evaluation
                )
            # calibrate + compress; writing and verifying the output are not part of the method's cost
            prune_seconds = run.seconds["total"] - run.seconds.get("export", 0.0)
            checked = _verify_output(verifier, run, tmp / "models" / method) if verify else None
            with clock(f"evaluating {method}", " (and verifying its output in a fresh process)" * verify):
                run.model.to(compute_dtype(run.model.dtype))  # the output is written: upcast in place
                results[method] = evaluate_model(run.model, run.tokenizer, **evaluate)
                if checked is not None:
                    checked.result()  # raises if the output failed verification
                    _say(progress, f"{method}: {_verification_line(run.plan.verification)}")
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
    clock.summary()
    return Path(out) / "report.md"


def _verify_output(verifier: ThreadPoolExecutor, run: PruneResult, directory: Path) -> Future:
    """Start verifying the exported ``directory`` against ``run``'s model; the plan and model card in
    it record the outcome (as ``prune`` writes them), and the future raises if it failed."""
    reference = copy.deepcopy(run.model)  # the evaluation may upcast run.model meanwhile
    name = directory.name

    def card(plan: ModelPlan) -> str:
        return model_card(plan, run.before, run.after, name, run.sparsity)

    return verifier.submit(verify_before_commit(run.plan, card, reference, progress=False), directory)


def _verification_line(verification: dict | None) -> str:
    checks = ", ".join(f"{name} {check['status']}" for name, check in (verification or {}).items())
    return f"output verified in a fresh process ({checks})"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[demo] {message}", flush=True)


class _Clock:
    """Announces each stage, times it, and prints the stage times and the total wall time at the end."""

    def __init__(self, progress: bool) -> None:
        self.progress, self.start, self.stages = progress, time.perf_counter(), []

    @contextlib.contextmanager
    def __call__(self, stage: str, note: str = "") -> Iterator[None]:
        _say(self.progress, stage + note)
        start = time.perf_counter()
        yield
        self.stages.append((stage, time.perf_counter() - start))

    def summary(self) -> None:
        total = time.perf_counter() - self.start
        for stage, seconds in self.stages:
            _say(self.progress, f"{seconds:6.1f} s  {stage}")
        _say(self.progress, f"wall time {total:.0f} s ({int(total // 60)} min {total % 60:02.0f} s)")
