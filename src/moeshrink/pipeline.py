"""The Python API: :func:`prune` runs a :class:`~moeshrink.job.Job`; :func:`apply_plan` re-applies a
saved plan to the checkpoint it was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeshrink.errors import MoeShrinkError
from moeshrink.info import describe_model
from moeshrink.io.checkpoint import checkpoint_fingerprint, content_fingerprint, load_model
from moeshrink.io.export import export_checkpoint, load_plan
from moeshrink.io.streaming import ShardReader, check_free_disk, estimate_output_bytes
from moeshrink.job import Job, PruneResult, open_checkpoint, resolve_keep, verify_by_default, versions
from moeshrink.plan import ModelPlan
from moeshrink.quant import refuse_quantized
from moeshrink.report.model_card import model_card
from moeshrink.surgery import apply_model_plan
from moeshrink.verify import verify_before_commit


def prune(model: str | Path | None = None, method: str | None = None, **fields: Any) -> PruneResult:
    """Compress the checkpoint at ``model`` with the expert-level ``method`` and (with ``output``)
    export it; ``fields`` are :class:`~moeshrink.job.Job`'s.

    Budget: ``keep`` experts per layer or ``ratio`` removed (``global_budget``: shared out over the
    layers by usage). ``sparsity`` (a fraction) or ``nm`` ("2:4") also zeroes weights inside the
    surviving experts (``sparsity_method`` wanda, owl or magnitude; ``sparsity_scope`` adds attention
    or dense linears); ``total_sparsity`` asks for that fraction of the original in-scope weights to
    be gone, removed experts included (STUN's budget). ``top_k`` lowers the active experts. Method
    ``none`` keeps every expert. ``stream`` reads, compresses and writes one decoder layer at a time
    (None: automatic for checkpoints over half the RAM); ``offload_hidden`` keeps the calibration
    hidden states in that directory. ``steps`` lists the steps in the order they run (a recipe's).
    Every input is checked before any weight is read."""
    return Job.build(model=model, method=method, **fields).run()


def apply_plan(
    model: str | Path,
    plan: str | Path | ModelPlan,
    output: str | Path | None = None,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    verify: bool | None = None,
    revision: str | None = None,
) -> PruneResult:
    """Re-apply a saved plan to the checkpoint it was made from (no calibration needed; ``revision``:
    of a Hub id); the output is verified before it is committed unless ``verify`` is False (None: the
    jobs' default)."""
    path, config, adapter = open_checkpoint(model, output, overwrite, revision)
    refuse_quantized(path, "moeshrink apply")
    plan = plan if isinstance(plan, ModelPlan) else load_plan(plan)
    plan = plan.model_copy(update={"verification": None})  # this export's own checks replace any recorded
    if plan.sparsity:
        raise MoeShrinkError(
            "this plan zeroed weights inside experts with masks computed from calibration data, which the plan "
            "does not store: rerun moeshrink prune with the same recipe to reproduce it"
        )
    fingerprint, content = plan.source.get("fingerprint"), plan.source.get("content_sha256")
    if (fingerprint and fingerprint != checkpoint_fingerprint(path)) or (
        content and content != content_fingerprint(path)
    ):
        raise MoeShrinkError(
            f"{path} is not the checkpoint this plan was made from ({plan.source.get('path')}): "
            "its config, weight files or weights differ"
        )
    if output is not None:  # every shard present and complete, and room for the output, before loading
        refit = bool(plan.refit_state())
        keep = max(plan.num_experts_after)
        reader = ShardReader(path)
        check_free_disk(
            output, estimate_output_bytes(reader, adapter, config, keep, dtype=dtype, refit=refit)
        )
    loaded = load_model(path, dtype)
    before = describe_model(loaded.model, adapter)
    apply_model_plan(loaded.model, adapter, plan)
    after = describe_model(loaded.model, adapter)
    result = PruneResult(
        plan=plan, model=loaded.model, tokenizer=loaded.tokenizer, before=before, after=after
    )
    if output is not None:

        def card(plan: ModelPlan) -> str:
            return model_card(plan, before, after, Path(output).name, None)

        check = verify_by_default() if verify is None else verify
        export_checkpoint(
            loaded.model,
            adapter,
            plan,
            output,
            source=path,
            tokenizer=loaded.tokenizer,
            model_card=card(plan),
            overwrite=overwrite,
            before_commit=verify_before_commit(plan, card, loaded.model) if check else None,
        )
        result.output = Path(output)
    return result


__all__ = ["PruneResult", "apply_plan", "prune", "resolve_keep", "versions"]
