"""One job description, built alike by the ``moeshrink`` command, YAML recipes and the Python API.

A job is its run settings plus an ordered list of steps (``experts``, ``top_k``, ``recover``,
``sparsify``, ``stun`` as shorthand for STUN's two phases, and last ``quantize``: the finished output
handed to llm-compressor). The flat fields ``prune()`` and the command take
(``method``, ``keep``, ``ratio``, ``top_k``, ``sparsity``, ...) are a shorthand for the same steps;
given with a recipe that has steps, they override the matching step.

```yaml
model: path/to/checkpoint        # or org/name on the Hugging Face Hub (with revision:)
output: runs/pruned
calib: [data/task.jsonl]         # or calib_dataset: NAME (calib_config, calib_split, chat_template)
samples: 128
seq_len: 512
steps:
  - experts: {method: reap, keep: 8}
  - top_k: 1
  - recover: {ridge: 1.0}                # re-fit router rows and down projections (--recover)
  - sparsify: {sparsity: 0.5, method: wanda}
  - quantize: {scheme: W4A16}            # then llm-compressor (--quantize; the quantize extra)
```

:meth:`Job.check` validates the whole job against the weightless (meta) model — family, budget,
method options, sparsity, output directory, shards, free disk, calibration files — before any
weight is read or any text is tokenised; :meth:`Job.run` then does the work.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

import moeshrink
from moeshrink.arch import FamilyAdapter, GroupedFamilyAdapter
from moeshrink.engine import distributed
from moeshrink.engine.data import (
    DatasetName,
    build_calibration,
    check_calibration_dataset,
    check_calibration_files,
)
from moeshrink.engine.offload import ResidentLayers
from moeshrink.engine.runner import run_steps
from moeshrink.engine.steps import ExpertsStep, LayerStep, RecoverStep, SparsifyStep, TopKStep
from moeshrink.errors import MoeShrinkError
from moeshrink.info import ModelInfo, describe_model, meta_model
from moeshrink.io.checkpoint import (
    TOKENIZER_FILES,
    checkpoint_fingerprint,
    content_fingerprint,
    has_chat_template,
    load_config,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
)
from moeshrink.io.export import check_output_dir, export_checkpoint
from moeshrink.io.hub import hub_source
from moeshrink.io.streaming import (
    ShardReader,
    StreamedLayers,
    check_free_disk,
    choose_streaming,
    estimate_output_bytes,
)
from moeshrink.methods import ExpertMethod, get_method
from moeshrink.plan import PLAN_FILENAME, LayerPlan, ModelPlan
from moeshrink.quant import read_quantization
from moeshrink.quant.oneshot import Scheme, check_quantize, check_scheme, quantize_output
from moeshrink.quant.source import QuantizedCheckpoint, QuantizedLayers, check_quantized_job, spill_bytes
from moeshrink.report.model_card import model_card
from moeshrink.runtime import compute_dtype
from moeshrink.sparsity.accounting import SparsityReport, count_sparsity
from moeshrink.sparsity.layer import SparsitySpec, inside_sparsity, parse_scope, scoped_parameter_names
from moeshrink.sparsity.masks import validate_sparsity
from moeshrink.surgery import update_config
from moeshrink.verify import verify_before_commit, verify_checkpoint


class ExpertsSpec(BaseModel):
    """An expert-level method and its budget: ``keep`` experts per layer or ``ratio`` removed;
    ``global_budget`` shares that total out over the layers by usage."""

    model_config = ConfigDict(extra="forbid")
    method: str
    keep: int | None = None
    ratio: float | None = None
    options: dict[str, Any] = {}
    global_budget: bool = False


# The recover step's ridge, relative to the mean diagonal of each fit's Gram matrix: chosen on the
# testbed's validation split (docs/recovery.md).
RECOVER_RIDGE = 1.0
RECOVER_RIDGE_MAX = 100.0


class RecoverSpec(BaseModel):
    """Re-fit the kept experts' router rows (``router``) and down projections (``down``) after an
    expert-level method, by ridge least squares (``ridge``, relative to each Gram's mean diagonal;
    larger keeps the weights closer to the compressed ones)."""

    model_config = ConfigDict(extra="forbid")
    ridge: float = Field(RECOVER_RIDGE, gt=0, le=RECOVER_RIDGE_MAX)
    router: bool = True
    down: bool = True


class SparsifySpec(BaseModel):
    """Zeros inside the experts (and, by ``scope``, attention / dense linears): a fraction
    ``sparsity``, an ``nm`` pattern, or a ``total_sparsity`` counting the removed experts."""

    model_config = ConfigDict(extra="forbid")
    sparsity: float | None = None
    total_sparsity: float | None = None
    method: str = "wanda"
    nm: str | None = None
    scope: str | list[str] | None = None
    # OWL only: how far a layer's sparsity may move from the mean (None: the default, 0.02)
    owl_lambda: float | None = Field(None, ge=0)


class StunSpec(BaseModel):
    """STUN in one step: expert pruning (phase 1) then Wanda/OWL up to a total sparsity (phase 2)."""

    model_config = ConfigDict(extra="forbid")
    expert_ratio: float
    total_sparsity: float | None = None
    sparsity_method: str = "wanda"
    options: dict[str, Any] = {}


class QuantizeSpec(BaseModel):
    """After everything else: quantize the output with llm-compressor's ``oneshot`` (``scheme``: one of
    :data:`moeshrink.quant.oneshot.SCHEMES`) on the same calibration tokens; ``ignore``: modules left
    unquantized besides ``lm_head`` and the routers."""

    model_config = ConfigDict(extra="forbid")
    scheme: str
    ignore: list[str] = []


class Step(BaseModel):
    """One step of a recipe: exactly one of its fields is set."""

    model_config = ConfigDict(extra="forbid")
    experts: ExpertsSpec | None = None
    top_k: int | None = Field(None, ge=1)
    recover: RecoverSpec | None = None
    sparsify: SparsifySpec | None = None
    stun: StunSpec | None = None
    quantize: QuantizeSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if sum(getattr(self, k) is not None for k in STEP_KINDS) != 1:
            raise ValueError(
                "each step has exactly one kind: 'experts', 'top_k', 'recover', 'sparsify', 'stun' or 'quantize'"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


STEP_KINDS = ("experts", "top_k", "recover", "sparsify", "stun", "quantize")


# The flat shorthand: field -> (step kind, field of that step).
SHORTHAND = {
    "method": ("experts", "method"),
    "keep": ("experts", "keep"),
    "ratio": ("experts", "ratio"),
    "method_options": ("experts", "options"),
    "global_budget": ("experts", "global_budget"),
    "top_k": ("top_k", None),
    "recover": ("recover", None),
    "recover_ridge": ("recover", "ridge"),
    "sparsity": ("sparsify", "sparsity"),
    "total_sparsity": ("sparsify", "total_sparsity"),
    "sparsity_method": ("sparsify", "method"),
    "nm": ("sparsify", "nm"),
    "sparsity_scope": ("sparsify", "scope"),
    "owl_lambda": ("sparsify", "owl_lambda"),
    "quantize": ("quantize", "scheme"),
}
# Shorthand fields that alone make a step (the others only qualify one).
MAKES_STEP = {"method", "top_k", "sparsity", "total_sparsity", "nm", "recover", "quantize"}


def _fold_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """Turn the flat shorthand fields into steps (or overrides of the recipe's steps); expand ``stun``."""
    data = dict(data)
    steps: list[dict[str, Any]] = []
    for step in data.pop("steps", None) or []:
        step = step.model_dump(exclude_none=True) if isinstance(step, Step) else dict(step)
        stun = step.get("stun")
        if isinstance(stun, dict):
            steps.append(
                {"experts": {"method": "stun", "ratio": stun.get("expert_ratio"), **_only(stun, "options")}}
            )
            if stun.get("total_sparsity") is not None:
                sparsify = {
                    "total_sparsity": stun["total_sparsity"],
                    "method": stun.get("sparsity_method", "wanda"),
                }
                steps.append({"sparsify": sparsify})
            continue
        steps.append(step)
    given = {k: data.pop(k) for k in list(data) if k in SHORTHAND}
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("sparsity") == 0:
        given.pop("sparsity")
    for kind in ("experts", "top_k", "recover", "sparsify", "quantize"):
        fields = {SHORTHAND[k][1]: v for k, v in given.items() if SHORTHAND[k][0] == kind}
        if not fields:
            continue
        existing = next((s for s in steps if kind in s), None)
        if kind == "recover":
            _fold_recover(steps, existing, fields)
            continue
        if kind == "top_k":
            if existing is not None:
                existing["top_k"] = fields[None]
            else:  # before a recover step, which fits the routing as it will be
                recover = [i for i, s in enumerate(steps) if "recover" in s]
                steps.insert(recover[0] if recover else _before_quantize(steps), {"top_k": fields[None]})
            continue
        if existing is None:
            if not MAKES_STEP & {k for k in given if SHORTHAND[k][0] == kind}:
                continue
            existing = {kind: {}}
            steps.insert(0 if kind == "experts" else _before_quantize(steps), existing)
        body = existing[kind] = dict(existing[kind])
        if kind == "experts" and ("keep" in fields or "ratio" in fields):  # one budget: the new one
            body.pop("keep", None)
            body.pop("ratio", None)
        body.update(fields)
    if steps:
        data["steps"] = steps
    return data


def _before_quantize(steps: list[dict[str, Any]]) -> int:
    """Where a step added by the shorthand goes: last, but before a quantize step (which comes last)."""
    return next((i for i, s in enumerate(steps) if "quantize" in s), len(steps))


def _fold_recover(steps: list[dict[str, Any]], existing: dict | None, fields: dict[Any, Any]) -> None:
    """``recover`` (True: add the step, False: drop it) and ``recover_ridge``: the recover step goes
    after the experts and top-k steps, so it fits the routing as it will be."""
    if fields.get(None) is False:
        steps[:] = [s for s in steps if "recover" not in s]
        return
    if existing is None:
        if fields.get(None) is not True:
            raise MoeShrinkError("--recover-ridge sets the recover step's ridge: add --recover")
        existing = {"recover": {}}
        after = [i for i, s in enumerate(steps) if "experts" in s or "top_k" in s]
        steps.insert(after[-1] + 1 if after else 0, existing)
    body = existing["recover"] = dict(existing["recover"] or {})
    body.update({k: v for k, v in fields.items() if k is not None})


def record_recovery(
    layer_plans: list[LayerPlan], step: RecoverStep, recovered: dict[int, Any]
) -> dict[str, Any]:
    """Put what the recover ``step`` did (``recovered``, by layer) into the layer plans (errors, re-fitted
    tensors and their names) and return the plan's ``recovery`` summary."""
    for lp in layer_plans:
        done = recovered.get(lp.layer)
        if done is None:
            continue
        lp.recovery = done.errors
        lp.refit_tensors.update(done.tensors)
        for i, names in done.names().items():
            lp.experts[i].refit = sorted(set(lp.experts[i].refit) | set(names))
    errors = [lp.recovery for lp in layer_plans if lp.recovery]
    recovery = {"ridge": step.ridge, "router": step.router, "down": step.down} | {
        f"mean_{k}": sum(e[k] for e in errors) / len(errors) for k in ("before", "after") if errors
    }
    recovery["router_fitted_layers"] = sum(e.get("router") == "fitted" for e in errors)
    return recovery


def _only(d: dict, key: str) -> dict:
    return {key: d[key]} if key in d else {}


class Job(BaseModel):
    """Everything one ``moeshrink prune`` does (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    model: str | Path | None = None
    # a Hub revision (branch, tag or commit) when model is an org/name id
    revision: str | None = None
    output: str | Path | None = None
    steps: list[Step] = []
    calib: list[str | Path] | str | Path | None = None
    # or a calibration set by its datasets name (a Hub id or a local data folder), config and split
    calib_dataset: str | None = None
    calib_config: str | None = None
    calib_split: str | None = None
    # the field holding each document (default: text; with chat_template: messages)
    calib_field: str | None = None
    # the field holds chat messages, rendered with the tokenizer's chat template
    chat_template: bool = False
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)
    error_propagation: bool = True
    stream: bool | None = None
    offload_hidden: str | Path | None = None
    overwrite: bool = False
    # Verify the output in a fresh process before it is committed (moeshrink.verify).
    verify: bool = Field(default_factory=lambda: verify_by_default())
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_shorthand(data) if isinstance(data, dict) else data

    @classmethod
    def build(cls, **fields: Any) -> Job:
        """A job from keyword fields (the shorthand included), or a one-line error."""
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            raise MoeShrinkError(validation_message(e, "job")) from e

    def updated(self, **fields: Any) -> Job:
        """This job with some fields (shorthand included) given again, e.g. command-line overrides."""
        current = self.model_dump(exclude_unset=True)
        current["steps"] = [s.model_dump(exclude_none=True) for s in self.steps]
        return Job.build(**(current | {k: v for k, v in fields.items() if v is not None}))

    def step_of(self, kind: str) -> Any:
        found = [getattr(s, kind) for s in self.steps if s.kind == kind]
        if len(found) > 1:
            raise MoeShrinkError(
                f"only one '{kind}' step per job: the plan records one of each per layer; merge them into one"
            )
        return found[0] if found else None

    def check(self) -> CheckedJob:
        """Validate everything against the weightless model; nothing is loaded or tokenised."""
        return check_job(self)

    def run(self) -> PruneResult:
        """Validate, then load -> calibrate -> run the steps -> export."""
        return self.check().run()


def verify_by_default() -> bool:
    """Jobs verify their output unless ``MOESHRINK_VERIFY=0`` (the test suite sets it: a fresh process
    per prune would multiply its run time; the verification tests turn it back on)."""
    return os.environ.get("MOESHRINK_VERIFY", "1") != "0"


def validation_message(error: ValidationError, what: str) -> str:
    """The first problem as one line: where it is, and for a step's field the option that sets it."""
    first = error.errors()[0]
    loc = first["loc"]
    where = ".".join(str(p) for p in loc) or what
    if len(loc) >= 3 and loc[0] == "steps":
        key = (loc[2], loc[3] if len(loc) > 3 and loc[2] != "top_k" else None)
        flag = next((name for name, target in SHORTHAND.items() if target == key), None)
        if flag is not None:
            where += f" (--{flag.replace('_', '-')})"
    return f"{where}: {first['msg']}"


def load_recipe(path: str | Path) -> Job:
    """A job from a YAML recipe file, or a one-line error naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise MoeShrinkError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Job.model_validate(data)
    except UnicodeDecodeError as e:
        raise MoeShrinkError(f"{path}: not UTF-8 text (byte {e.start}): save the recipe as UTF-8") from e
    except yaml.YAMLError as e:
        raise MoeShrinkError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    except ValidationError as e:
        raise MoeShrinkError(f"{path}: {validation_message(e, 'recipe')}") from e


@dataclass
class PruneResult:
    """The compressed model in memory, its plan, and what it cost."""

    plan: ModelPlan
    model: nn.Module
    tokenizer: Any
    before: ModelInfo
    after: ModelInfo
    output: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    sparsity: SparsityReport | None = None


def resolve_keep(num_experts: int, keep: int | None, ratio: float | None) -> int:
    """Experts kept per layer from ``keep`` (a count) or ``ratio`` (the fraction removed)."""
    if (keep is None) == (ratio is None):
        raise MoeShrinkError(
            "give exactly one budget: --keep K (experts kept per layer) or --ratio R (fraction removed)"
        )
    if ratio is not None:
        if not 0 < ratio < 1:
            raise MoeShrinkError(
                f"--ratio is the fraction of experts removed and must be in (0, 1), got {ratio}"
            )
        keep = max(1, round(num_experts * (1 - ratio)))
    if keep < 1:
        raise MoeShrinkError(f"--keep must be at least 1, got {keep}")
    return int(keep)


def versions() -> dict[str, str]:
    import transformers

    return {
        "moeshrink": moeshrink.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_info(path: Path, adapter: FamilyAdapter, config) -> dict[str, Any]:
    """What the plan records of the checkpoint it was made from (a Hub snapshot: its id and commit too)."""
    hub = hub_source(path)
    return {
        "path": str(path.resolve()),
        **({"hub": hub} if hub else {}),
        "model_type": adapter.model_type,
        "num_experts": adapter.num_experts(config),
        "top_k": int(config.num_experts_per_tok),
        "fingerprint": checkpoint_fingerprint(path),
        "content_sha256": content_fingerprint(path),
    }


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoeShrinkError(f"--device {device} asked but no CUDA device is available: use --device cpu")
    return device


def open_checkpoint(
    model: str | Path | None, output: str | Path | None, overwrite: bool, revision: str | None = None
):
    """The checkpoint (a local directory, or a Hub id at ``revision`` from the cache or downloaded), the
    output (never inside, around or equal to the input), then the config and family adapter: the start
    of every job (prune, apply, search)."""
    if model is None:
        raise MoeShrinkError("no model given: moeshrink prune MODEL ... (or 'model:' in the recipe)")
    path = resolve_checkpoint(model, revision)
    if output is not None:
        check_output_dir(output, overwrite, source=path)
    config, adapter = load_config(path)
    read_quantization(path)  # a scheme moeshrink cannot work on is refused before anything else
    return path, config, adapter


def sparsify_spec(s: SparsifySpec) -> SparsitySpec:
    """The sparsity of a step (with a total budget the fraction inside is resolved later)."""
    if s.owl_lambda is not None and s.method != "owl":
        raise MoeShrinkError(
            f"--owl-lambda sets how far OWL moves each layer's sparsity: it needs --sparsity-method owl, "
            f"not {s.method}"
        )
    if s.total_sparsity is not None:
        if s.sparsity is not None or s.nm:
            raise MoeShrinkError("give either --total-sparsity or --sparsity / --nm, not both")
        validate_sparsity(s.total_sparsity, "total sparsity")
        spec = SparsitySpec(0.0, s.method, scope=parse_scope(s.scope))
    else:
        spec = SparsitySpec.parse(s.sparsity, s.method, s.nm, s.scope)
        if spec is None:
            raise MoeShrinkError("a sparsify step needs sparsity, total_sparsity or nm")
    return spec if s.owl_lambda is None else replace(spec, owl_lambda=s.owl_lambda)


@dataclass
class CheckedJob:
    """A job whose every input has been checked: what :meth:`run` needs, nothing loaded yet."""

    job: Job
    path: Path
    config: Any
    adapter: FamilyAdapter
    reader: ShardReader
    method: ExpertMethod
    steps: list[LayerStep]
    keep: int
    ratio: float | None
    top_k: int
    global_budget: bool
    stream: bool
    device: str
    calib_paths: list[str | Path] | None
    calib_dataset: DatasetName | None = None
    calib_field: str = "text"
    quantized: QuantizedCheckpoint | None = None  # a block-FP8 or compressed-tensors input (moeshrink.quant)
    # the quantize step: the scheme and ignore list handed to llm-compressor (moeshrink.quant.oneshot)
    quantize: tuple[Scheme, list[str]] | None = None
    requantize: bool = False  # the job changes weights of the quantized input: re-quantized on export

    def run(self) -> PruneResult:
        """Load -> calibrate -> run the steps -> update the config -> export."""
        job, adapter, timings = self.job, self.adapter, {}
        start = time.perf_counter()
        if distributed.launched_distributed():
            self.device = str(distributed.init_distributed(self.device))
        tokenizer = load_tokenizer(self.path)
        calibration = None
        if self.calib_paths is not None or self.calib_dataset is not None:
            calibration = build_calibration(
                tokenizer,
                self.calib_paths,
                job.samples,
                job.seq_len,
                job.seed,
                self.calib_field,
                dataset=self.calib_dataset,
                chat=job.chat_template,
            )
        timings["prepare"] = time.perf_counter() - start
        t = time.perf_counter()
        sparsifies = any(isinstance(s, SparsifyStep) for s in self.steps)
        if self.quantized is not None:  # read and dequantized one layer at a time
            source = QuantizedLayers(
                self.path,
                self.config,
                adapter,
                self.reader,
                self.quantized,
                job.dtype,
                resident=not self.stream,
                requantize=self.requantize,
                count_zeros=sparsifies and self.stream,
                spill=None if job.output is None else Path(job.output).absolute().parent,
            )
            if not self.stream:
                source.load_all()
        elif self.stream:
            source = StreamedLayers(
                self.path,
                self.config,
                adapter,
                self.reader,
                job.dtype,
                output=job.output,
                count_zeros=sparsifies,
            )
        else:
            source = ResidentLayers(load_model(self.path, job.dtype, tokenizer, self.device).model, adapter)
        timings["load"] = time.perf_counter() - t
        compute = compute_dtype(source.model.dtype, self.device)  # what the layer loop computes in
        before = describe_model(source.model, adapter)

        t = time.perf_counter()
        input_ids = distributed.shard(calibration.input_ids) if calibration else None
        steps, records = run_steps(
            source,
            self.steps,
            input_ids,
            device=self.device,
            batch_size=job.batch_size,
            error_propagation=job.error_propagation,
            progress=job.progress and distributed.rank() == 0,
            offload_hidden=job.offload_hidden,
        )
        plan = self._plan(steps, records, calibration, compute)
        if self.quantized is not None:
            plan.source["quantization"] = source.describe(plan)
        update_config(
            source.model, adapter, {lp.layer: lp.num_experts_after for lp in plan.layers}, self.top_k
        )
        timings["compress"] = time.perf_counter() - t

        after = describe_model(source.model, adapter)
        result = PruneResult(plan=plan, model=source.model, tokenizer=tokenizer, before=before, after=after)
        if sparsifies:
            result.sparsity = source.sparsity_report() if self.stream else count_sparsity(source.model)
            self._total_achieved(plan, result.sparsity, steps, source.model)
        if job.output is not None:
            t = time.perf_counter()
            if distributed.rank() == 0:  # every rank holds the same compressed model; one writes it
                name = Path(job.output).name

                def card(plan: ModelPlan) -> str:
                    return model_card(plan, before, after, name, result.sparsity)

                # a streamed model is a skeleton: the fresh-process load is checked, not compared
                # a re-quantized output differs from the computed model by the re-quantization error (recorded)
                reference = None if self.stream or self.requantize else source.model
                verify = (
                    verify_before_commit(plan, card, reference, progress=job.progress) if job.verify else None
                )
                if self.quantize is not None:
                    verify = self._quantize_before_commit(plan, card, verify, calibration)
                if self.quantized is not None:  # the input's tensors, kept experts bit-exact
                    source.commit(
                        plan,
                        job.output,
                        overwrite=job.overwrite,
                        tokenizer=tokenizer,
                        model_card=card,
                        before_commit=verify,
                    )
                elif self.stream:
                    source.commit(plan, tokenizer=tokenizer, model_card=card(plan), before_commit=verify)
                else:
                    export_checkpoint(
                        source.model,
                        adapter,
                        plan,
                        job.output,
                        source=self.path,
                        tokenizer=tokenizer,
                        model_card=card(plan),
                        overwrite=job.overwrite,
                        before_commit=verify,
                    )
            distributed.barrier()
            result.output = Path(job.output)
            timings["export"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        result.seconds = timings
        return result

    def _quantize_before_commit(self, plan: ModelPlan, card, verify, calibration) -> Callable[[Path], None]:
        """The last thing done to the finished temporary output: verify the pruned export (as every job
        does), quantize it in place with llm-compressor, record that in the plan and card, and check the
        quantized checkpoint in a fresh process; a failure leaves nothing written."""
        scheme, ignore = self.quantize
        job = self.job

        def quantize(directory: Path) -> None:
            if verify is not None:
                verify(directory)
            input_ids = calibration.input_ids if calibration is not None else None
            plan.quantization = quantize_output(directory, scheme, ignore, input_ids, progress=job.progress)
            if job.verify:
                verification = verify_checkpoint(directory)
                plan.quantization["verification"] = verification.to_dict()
                if job.progress:
                    print(verification.to_text(), file=sys.stderr)
                if verification.failed:
                    raise MoeShrinkError(
                        "the quantized output failed verification and was not written: "
                        + "; ".join(c.to_text() for c in verification.failed)
                        + " (--no-verify writes it without checking)"
                    )
            plan.save(directory / PLAN_FILENAME)
            (directory / "README.md").write_text(card(plan))

        return quantize

    def _plan(
        self, steps: list[LayerStep], records: list[dict[int, Any]], calibration, compute: torch.dtype
    ) -> ModelPlan:
        """The plan: the experts step's layer plans with each layer's sparsity attached (``compute``:
        the dtype the layer loop computed in)."""
        by_kind = {s.kind: (s, done) for s, done in zip(steps, records, strict=True)}
        experts, planned = by_kind["experts"]
        layer_plans: list[LayerPlan] = list(planned.values())
        recover, recovered = by_kind.get("recover", (None, {}))
        recovery = record_recovery(layer_plans, recover, recovered) if recover is not None else None
        sparsify, sparsified = by_kind.get("sparsify", (None, {}))
        summary = None
        if sparsify is not None:
            done = dict(sparsified)
            for lp in layer_plans:
                lp.sparsity = done.pop(lp.layer, None)
            summary = sparsify.spec.to_dict() | (sparsify.accounting or {})
            if done:  # decoder layers without routed experts that were sparsified too
                summary["dense_layers"] = {str(i): d for i, d in sorted(done.items())}
        budget = {"keep": self.keep} | ({"ratio": self.ratio} if self.ratio is not None else {})
        if self.global_budget:
            budget |= {
                "scope": "global",
                "total": sum(experts.per_layer.values()),
                "per_layer": experts.per_layer,
            }
        return ModelPlan(
            method=experts.method.name,
            method_options=experts.method.options,
            budget=budget,
            top_k=self.top_k,
            source=source_info(self.path, self.adapter, self.config),
            calibration=calibration.info
            | {
                "error_propagation": self.job.error_propagation,
                "processes": distributed.world_size(),
                "compute_dtype": str(compute).removeprefix("torch."),
            }
            if calibration
            else None,
            sparsity=summary,
            recovery=recovery,
            versions=versions(),
            layers=layer_plans,
        )

    def _total_achieved(
        self, plan: ModelPlan, report: SparsityReport, steps: list[LayerStep], model: nn.Module
    ) -> None:
        """With a total budget: the fraction of the original in-scope weights now gone, counted."""
        sparsify = next(s for s in steps if isinstance(s, SparsifyStep))
        if sparsify.total is None:
            return
        in_scope = scoped_parameter_names(model, self.adapter, sparsify.spec.scope)
        remaining = sum(t.total - t.zeros for t in report.tensors if t.name in in_scope)
        plan.sparsity["total_sparsity_achieved"] = 1 - remaining / sparsify.accounting["scope_weights"]


def check_job(job: Job) -> CheckedJob:
    """Every check of a job, in the order a user fixes them; nothing is loaded or tokenised."""
    path, config, adapter = open_checkpoint(job.model, job.output, job.overwrite, job.revision)
    scheme = read_quantization(path)  # a scheme moeshrink cannot work on is refused first
    num_experts = adapter.num_experts(config)
    experts_spec = job.step_of("experts")
    top_k_given = job.step_of("top_k")
    sparsify_given = job.step_of("sparsify")
    recover_given = job.step_of("recover")
    quantize_given = job.step_of("quantize")
    if recover_given is not None:
        _check_recover_order(job, experts_spec)
    quantize_scheme = _check_quantize_step(job, quantize_given, scheme, experts_spec)
    if experts_spec is None:
        raise MoeShrinkError("no method given: pass --method NAME (or 'method:' in the recipe)")
    method = get_method(experts_spec.method, seed=job.seed, **experts_spec.options)
    if recover_given is not None and method.name == "none":
        raise MoeShrinkError(
            "nothing to recover: method 'none' keeps every expert; add --method NAME --keep K (recovery re-fits "
            "what an expert-level method left wrong)"
        )
    top_k = int(top_k_given if top_k_given is not None else config.num_experts_per_tok)
    if method.name == "none":
        if experts_spec.keep is not None or experts_spec.ratio is not None:
            raise MoeShrinkError("method 'none' keeps every expert: drop --keep / --ratio")
        keep = num_experts
        adapter.check_top_k(config, top_k, keep)
    else:
        keep = resolve_keep(num_experts, experts_spec.keep, experts_spec.ratio)
        adapter.check_budget(config, keep, top_k)
    spec = sparsify_spec(sparsify_given) if sparsify_given is not None else None
    if (
        method.name == "none"
        and spec is None
        and top_k == int(config.num_experts_per_tok)
        and quantize_given is None
    ):
        raise MoeShrinkError(
            "method 'none' with no --sparsity, --nm, --top-k change or --quantize would change nothing"
        )
    device = check_device(job.device)
    if experts_spec.global_budget and method.name == "none":
        raise MoeShrinkError(
            "a global budget shares out the experts kept: it needs a method other than 'none'"
        )
    skeleton = meta_model(config, adapter)
    moe_layers = [layer.index for layer in adapter.moe_layers(skeleton)]
    if sparsify_given is not None and sparsify_given.total_sparsity is not None:
        kinds = [s.kind for s in job.steps]
        if kinds.index("sparsify") < kinds.index("experts"):
            raise MoeShrinkError(
                "a total sparsity counts the experts removed: put the sparsify step after the experts step"
            )
        # fails here, before anything is loaded, if removing experts alone takes more
        uniform = dict.fromkeys(range(int(config.num_hidden_layers)), keep)
        inside_sparsity(skeleton, adapter, spec.scope, uniform, sparsify_given.total_sparsity)
    wants_data = spec is not None and spec.uses_wanda
    quantize_data = quantize_scheme is not None and quantize_scheme.calibrates
    calib_paths, calib_dataset, calib_field = None, None, "text"
    if method.needs or wants_data or experts_spec.global_budget or recover_given is not None or quantize_data:
        calib_paths, calib_dataset, calib_field = _check_calibration(
            job,
            method,
            experts_spec.global_budget,
            path,
            recover_given is not None,
            quantize_scheme if quantize_data else None,
        )
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and job.seq_len > int(positions):
            raise MoeShrinkError(
                f"--seq-len {job.seq_len} is longer than the {positions} positions this model was built for: "
                f"calibrate with --seq-len {positions} or less"
            )
    quantize = None
    if quantize_given is not None:  # the scheme's group size divides every weight; the extra installed
        quantize = check_quantize(quantize_scheme.preset, adapter, skeleton, quantize_given.ignore)
    reader = ShardReader(path)  # every shard present and complete, before anything is written
    if job.output is not None:
        refit = recover_given is not None or bool(
            getattr(getattr(method, "settings", None), "reconstruct", False)
        )
        estimate = estimate_output_bytes(reader, adapter, config, keep, dtype=job.dtype, refit=refit)
        if (
            quantize is not None
        ):  # the quantized weights are written beside the pruned ones, then replace them
            estimate = int(estimate * 1.6)
        check_free_disk(job.output, estimate)
    stream = choose_streaming(
        job.stream,
        reader,
        job.output,
        {"OWL": spec is not None and spec.method == "owl", "torchrun": distributed.world_size() > 1},
    )
    quantized, requantize = None, False
    if scheme is not None:
        quantized, stream, requantize = check_quantized_job(
            path,
            scheme,
            reader,
            method=method,
            sparsifies=spec is not None,
            recovers=recover_given is not None,
            stream=job.stream,
            output=job.output,
            world_size=distributed.world_size(),
        )
        if requantize and stream and job.output is not None:  # changed experts spilled beside the output
            check_free_disk(job.output, estimate + spill_bytes(skeleton, adapter, config, keep))
    if stream and experts_spec.global_budget and job.steps[0].kind != "experts":
        raise MoeShrinkError(
            "--stream measures a global budget on the unchanged model before anything is written: make the "
            "experts step the first step, or run without --stream"
        )
    groups = GroupedFamilyAdapter.num_groups(config) if isinstance(adapter, GroupedFamilyAdapter) else 1
    steps: list[LayerStep] = []
    for s in job.steps:
        if s.kind == "experts":
            steps.append(
                ExpertsStep(
                    method=method,
                    per_layer=dict.fromkeys(moe_layers, keep),
                    top_k=top_k,
                    groups=groups,
                    global_total=keep * len(moe_layers) if experts_spec.global_budget else None,
                    global_minimum=max(top_k, 2 * groups if groups > 1 else top_k),
                )
            )
        elif s.kind == "top_k":
            steps.append(TopKStep(top_k))
        elif s.kind == "recover":
            steps.append(RecoverStep(ridge=s.recover.ridge, router=s.recover.router, down=s.recover.down))
        elif s.kind == "quantize":  # not a layer step: it runs on the finished output
            continue
        else:
            steps.append(SparsifyStep(spec, total=sparsify_given.total_sparsity))
    return CheckedJob(
        job=job,
        path=path,
        config=config,
        adapter=adapter,
        reader=reader,
        method=method,
        steps=steps,
        keep=keep,
        ratio=experts_spec.ratio,
        top_k=top_k,
        global_budget=experts_spec.global_budget,
        stream=stream,
        device=device,
        quantized=quantized,
        quantize=quantize,
        requantize=requantize,
        calib_paths=calib_paths,
        calib_dataset=calib_dataset,
        calib_field=calib_field,
    )


def _check_recover_order(job: Job, experts_spec: ExpertsSpec | None) -> None:
    """A recover step follows the experts step (only top-k steps between them, none after it): it
    compares each layer with the original in the same pass and fits the routing as it will be."""
    kinds = [s.kind for s in job.steps]
    if experts_spec is None or kinds.index("recover") < kinds.index("experts"):
        raise MoeShrinkError(
            "nothing to recover: recovery re-fits what an expert-level method left wrong; add --method NAME "
            "--keep K (an experts step before the recover step)"
        )
    between = kinds[kinds.index("experts") + 1 : kinds.index("recover")]
    if any(k != "top_k" for k in between) or "top_k" in kinds[kinds.index("recover") :]:
        raise MoeShrinkError(
            "put the recover step right after the experts step (and any top_k step): it fits each layer as "
            "the expert-level method and the final top-k leave it"
        )


def _check_quantize_step(
    job: Job, given: QuantizeSpec | None, input_scheme: Any, experts_spec: ExpertsSpec | None
) -> Scheme | None:
    """A quantize step: a scheme moeshrink hands to llm-compressor, last in the job, on an input that is
    not quantized already, with a uniform budget (llm-compressor loads standard checkpoints) and an
    output directory. The extra and the group sizes are checked once the model's shape is known."""
    if given is None:
        return None
    scheme = check_scheme(given.scheme)
    if job.steps[-1].kind != "quantize":
        raise MoeShrinkError("put the quantize step last: it quantizes the finished output")
    if input_scheme is not None:
        raise MoeShrinkError(
            f"--quantize {scheme.preset}: the input is quantized already ({input_scheme.name}); prune it without "
            "--quantize (its kept experts are copied bit-exact), or quantize the unquantized original"
        )
    if experts_spec is not None and experts_spec.global_budget:
        raise MoeShrinkError(
            f"--quantize {scheme.preset} hands the output to llm-compressor, which loads standard checkpoints; a "
            "global budget writes per-layer expert counts: drop --global-budget (a uniform --keep)"
        )
    if job.output is None:
        raise MoeShrinkError(
            f"--quantize {scheme.preset} writes a compressed-tensors checkpoint: give an output directory (-o OUT)"
        )
    return scheme


def _check_calibration(
    job: Job,
    method: ExpertMethod,
    global_budget: bool,
    path: Path,
    recover: bool = False,
    quantize: Scheme | None = None,
) -> tuple[list[str | Path] | None, DatasetName | None, str]:
    """The calibration files (checked to exist) or named dataset (resolved, its rows not loaded), the
    field, and the tokenizer (checked to be there, with a chat template when one is asked for)."""
    if not job.calib and not job.calib_dataset:
        who = "recovery" if recover and not method.needs else f"method '{method.name}'"
        if quantize is not None and not method.needs and not recover and not global_budget:
            who = f"--quantize {quantize.preset} ({quantize.algorithm})"
        raise MoeShrinkError(
            f"{who}{' with a global budget' if global_budget else ''} needs calibration "
            "text: pass --calib FILE or --calib-dataset NAME"
        )
    if job.calib and job.calib_dataset:
        raise MoeShrinkError("give either --calib FILE... or --calib-dataset NAME, not both")
    if not job.calib_dataset and (job.calib_config or job.calib_split):
        raise MoeShrinkError(
            "--calib-config and --calib-split choose within --calib-dataset NAME: give it too"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise MoeShrinkError(f"{path} has no tokenizer files; calibration needs the model's tokenizer")
    if job.chat_template and not has_chat_template(path):
        raise MoeShrinkError(f"--chat-template: the tokenizer in {path} has no chat template")
    field = job.calib_field or ("messages" if job.chat_template else "text")
    if job.calib_dataset:
        named = DatasetName(job.calib_dataset, job.calib_config, job.calib_split)
        return None, check_calibration_dataset(named, field, job.chat_template), field
    paths = [job.calib] if isinstance(job.calib, (str, Path)) else list(job.calib)
    check_calibration_files(paths)
    return paths, None, field


__all__ = [
    "CheckedJob",
    "ExpertsSpec",
    "Job",
    "PruneResult",
    "QuantizeSpec",
    "RecoverSpec",
    "SparsifySpec",
    "Step",
    "StunSpec",
    "check_job",
    "load_recipe",
    "open_checkpoint",
    "resolve_keep",
    "source_info",
    "versions",
]
