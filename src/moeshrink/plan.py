"""Plans are data: which new experts are made from which old ones, and how their router rows are formed.

New expert ``i`` of a layer is ``sum_j weights[j] * P_j(old expert sources[j])`` where ``P_j``
permutes the intermediate neurons (``permutations[j]``, ``None`` = identity), and its router row
(weight, bias, correction bias) is ``sum_j router_weights[j] * old row sources[j]``. Keeping an
expert is the special case of one source with weight 1. A plan is JSON, so it can be saved with
the checkpoint, inspected, diffed and re-applied to the same original model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from moeshrink.errors import MoeShrinkError

PLAN_FORMAT = "moeshrink-plan/1"
PLAN_FILENAME = "moeshrink_plan.json"
# Weights a plan cannot express as combinations of old experts (least-squares re-fits), saved beside it.
# Everything moeshrink writes beside the weights that is not a model weight lives in this subfolder:
# vLLM (and SGLang) load every *.safetensors file at the top of a checkpoint folder and refuse one
# that holds tensors the model does not have.
EXTRAS_DIR = "moeshrink_extras"
REFIT_FILENAME = f"{EXTRAS_DIR}/refit.safetensors"
LEGACY_REFIT_FILENAME = "moeshrink_refit.safetensors"  # written at the top level before 0.2; still read


class NewExpert(BaseModel):
    """One expert of the compressed layer."""

    sources: list[int]
    weights: list[float]
    permutations: list[list[int] | None] | None = None
    router_weights: list[float]
    refit: list[str] = Field(
        default_factory=list,
        description="tensors re-fitted after merging or by recovery ('router.weight': its router row; "
        "see REFIT_FILENAME)",
    )

    @model_validator(mode="after")
    def _lengths_agree(self) -> NewExpert:
        n = len(self.sources)
        if n == 0 or len(self.weights) != n or len(self.router_weights) != n:
            raise ValueError("sources, weights and router_weights must be non-empty and of equal length")
        if self.permutations is not None and len(self.permutations) != n:
            raise ValueError("permutations must have one entry (or null) per source")
        if not all(math.isfinite(w) for w in (*self.weights, *self.router_weights)):
            raise ValueError(
                "merge and router weights must be finite numbers (a NaN or inf would poison the expert)"
            )
        for perm in self.permutations or []:
            if perm is not None and sorted(perm) != list(range(len(perm))):
                raise ValueError("each neuron permutation must list every neuron index exactly once")
        return self

    @classmethod
    def keep(cls, expert: int) -> NewExpert:
        return cls(sources=[expert], weights=[1.0], router_weights=[1.0])

    @property
    def is_plain_copy(self) -> bool:
        return (
            len(self.sources) == 1
            and self.weights == [1.0]
            and self.router_weights == [1.0]
            and (self.permutations is None or self.permutations[0] is None)
        )


class LayerPlan(BaseModel):
    """The new experts of one MoE layer, plus the scores that chose them (for the report)."""

    layer: int
    num_experts_before: int
    experts: list[NewExpert]
    scores: list[float] | None = None
    sparsity: dict[str, Any] | None = None
    top_k: int | None = Field(
        default=None, description="this layer's active experts, when not the plan's top_k"
    )
    details: dict[str, Any] | None = Field(
        default=None, description="what the method did in this layer beyond the result (e.g. its search cost)"
    )
    recovery: dict[str, Any] | None = Field(
        default=None,
        description="the recover step's relative error of the routed output on the calibration tokens, "
        "before and after (moeshrink.surgery.recover)",
    )
    _refit_tensors: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    @property
    def refit_tensors(self) -> dict[str, torch.Tensor]:
        """Re-fitted tensors by ``"{new expert}.{tensor name}"``; saved in REFIT_FILENAME, not in the JSON."""
        return self._refit_tensors

    @classmethod
    def keep(cls, layer: int, num_experts_before: int, kept: list[int], scores: list[float] | None = None):
        """Keep ``kept`` (renumbered 0..K-1 in ascending order of their old index), drop the rest."""
        return cls(
            layer=layer,
            num_experts_before=num_experts_before,
            experts=[NewExpert.keep(j) for j in sorted(kept)],
            scores=scores,
        )

    @model_validator(mode="after")
    def _top_k_fits(self) -> LayerPlan:
        if self.top_k is not None and not 1 <= self.top_k <= len(self.experts):
            raise ValueError(
                f"layer {self.layer}: top_k {self.top_k} must be between 1 and its {len(self.experts)} experts"
            )
        return self

    @property
    def num_experts_after(self) -> int:
        return len(self.experts)

    @property
    def kept(self) -> list[int]:
        """Old experts that survive as some new expert's source with non-zero weight."""
        return sorted({s for e in self.experts for s, w in zip(e.sources, e.weights, strict=True) if w != 0})

    @model_validator(mode="after")
    def _sources_in_range(self) -> LayerPlan:
        for e in self.experts:
            if any(not 0 <= s < self.num_experts_before for s in e.sources):
                raise ValueError(
                    f"layer {self.layer}: a source expert is outside 0..{self.num_experts_before - 1}"
                )
        return self


class ModelPlan(BaseModel):
    """Everything needed to reproduce a compressed checkpoint from the original one."""

    format: str = PLAN_FORMAT
    method: str
    method_options: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any]
    top_k: int
    source: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    # The recover step's settings and its mean error over the layers (per layer: LayerPlan.recovery).
    recovery: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    layers: list[LayerPlan]
    # The checks made on the exported checkpoint (moeshrink.verify): check -> status, detail, differences.
    verification: dict[str, Any] | None = None
    # Serving cost measured where it is served (moeshrink.verify.serving): engine, device, rows, ratios.
    serving: dict[str, Any] | None = None
    # The quantize step after pruning (moeshrink.quant.oneshot): scheme, ignore list, library versions.
    quantization: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_k_fits(self) -> ModelPlan:
        too_few = [lp.layer for lp in self.layers if lp.top_k is None and lp.num_experts_after < self.top_k]
        if self.top_k < 1 or too_few:
            raise ValueError(
                f"top_k {self.top_k} must be at least 1 and at most the experts each layer keeps"
                + (f" (layer {too_few[0]} keeps fewer)" if too_few else "")
            )
        return self

    @property
    def num_experts_after(self) -> list[int]:
        return [lp.num_experts_after for lp in self.layers]

    def refit_state(self) -> dict[str, torch.Tensor]:
        """All re-fitted tensors, keyed ``layers.{layer}.experts.{i}.{name}``."""
        return {
            f"layers.{lp.layer}.experts.{key}": t.contiguous()
            for lp in self.layers
            for key, t in lp.refit_tensors.items()
        }

    def attach_refit(self, state: dict[str, torch.Tensor]) -> None:
        """Put tensors read from REFIT_FILENAME back on their layer plans."""
        by_layer = {lp.layer: lp for lp in self.layers}
        for key, tensor in state.items():
            _, layer, _, rest = key.split(".", 3)
            by_layer[int(layer)].refit_tensors[rest] = tensor

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelPlan:
        """A saved plan, checked whole; a one-line error naming the file and the first problem."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MoeShrinkError(f"{path}: not a readable plan ({e})") from e
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise MoeShrinkError(f"{path}: not a moeshrink plan (format {found!r}, expected {PLAN_FORMAT})")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "plan"
            message = first["msg"].removeprefix("Value error, ")
            raise MoeShrinkError(f"{path}: not a valid plan: {where}: {message}") from e
