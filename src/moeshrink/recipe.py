"""YAML recipes: the same fields as ``moeshrink prune``, plus a list of steps.

```yaml
model: path/to/checkpoint
output: runs/pruned
calib: [data/task.jsonl]
samples: 128
seq_len: 512
steps:
  - experts: {method: reap, keep: 8}
  - top_k: 1
```

Step kinds: ``experts`` (an expert-level method and its budget; at most one), ``top_k`` (the
active experts per token after compression), ``sparsify`` (``sparsity``, ``total_sparsity`` or ``nm``,
``method`` wanda, owl or magnitude, ``scope`` experts/attention/dense/all) and ``stun`` (STUN's two
phases: ``{expert_ratio: 0.25, total_sparsity: 0.55, sparsity_method: wanda}``, in place of an
``experts`` step). Top-level fields (``method``, ``keep``, ``ratio``, ``top_k``, ...) are a shorthand
for the same steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moeshrink.errors import MoeShrinkError


class ExpertStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    keep: int | None = None
    ratio: float | None = None
    options: dict[str, Any] = {}


class SparsifyStep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float | None = None
    total_sparsity: float | None = None
    method: str = "wanda"
    nm: str | None = None
    scope: str | list[str] | None = None


class StunStep(BaseModel):
    """STUN in one step: expert pruning (phase 1) then Wanda/OWL up to a total sparsity (phase 2)."""

    model_config = ConfigDict(extra="forbid")
    expert_ratio: float
    total_sparsity: float | None = None
    sparsity_method: str = "wanda"
    options: dict[str, Any] = {}


class Step(BaseModel):
    """One step: exactly one of its fields is set."""

    model_config = ConfigDict(extra="forbid")
    experts: ExpertStep | None = None
    top_k: int | None = None
    sparsify: SparsifyStep | None = None
    stun: StunStep | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if sum(v is not None for v in (self.experts, self.top_k, self.sparsify, self.stun)) != 1:
            raise ValueError("each step has exactly one kind: 'experts', 'top_k', 'sparsify' or 'stun'")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    output: str | None = None
    method: str | None = None
    keep: int | None = None
    ratio: float | None = None
    method_options: dict[str, Any] = {}
    calib: list[str] | str | None = None
    calib_field: str = "text"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    top_k: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8
    error_propagation: bool = True
    sparsity: float | None = None
    sparsity_method: str = "wanda"
    nm: str | None = None
    sparsity_scope: str | list[str] | None = None
    total_sparsity: float | None = None
    global_budget: bool = False
    stream: bool | None = None
    offload_hidden: str | None = None
    overwrite: bool = False
    steps: list[Step] = []

    @model_validator(mode="after")
    def _fold_steps(self) -> Recipe:
        expert_steps = [s.experts for s in self.steps if s.experts is not None]
        expert_steps += [
            ExpertStep(method="stun", ratio=s.stun.expert_ratio, options=s.stun.options)
            for s in self.steps
            if s.stun is not None
        ]
        if len(expert_steps) > 1:
            raise ValueError("only one 'experts' (or 'stun') step is supported per recipe")
        if expert_steps:
            if self.method is not None:
                raise ValueError("give the method either at the top level or in an 'experts' step, not both")
            step = expert_steps[0]
            self.method, self.keep, self.ratio, self.method_options = (
                step.method,
                step.keep,
                step.ratio,
                step.options,
            )
        for s in self.steps:
            if s.top_k is not None:
                self.top_k = s.top_k
            if s.sparsify is not None:
                self.sparsity, self.sparsity_method, self.nm = (
                    s.sparsify.sparsity,
                    s.sparsify.method,
                    s.sparsify.nm,
                )
                self.sparsity_scope, self.total_sparsity = s.sparsify.scope, s.sparsify.total_sparsity
            if s.stun is not None:
                self.total_sparsity, self.sparsity_method = s.stun.total_sparsity, s.stun.sparsity_method
        self.steps = []
        return self

    def prune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`moeshrink.prune`."""
        data = self.model_dump(exclude={"steps", "model", "method"})
        return data


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MoeShrinkError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Recipe.model_validate(data)
    except yaml.YAMLError as e:
        raise MoeShrinkError(f"{path}: not valid YAML: {e}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        raise MoeShrinkError(f"{path}: {where}: {first['msg']}") from e
