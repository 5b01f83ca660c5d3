"""EEP: gradient-free evolutionary search of which experts to keep and how to merge the rest.

A candidate gives each MoE layer a merge matrix ``M [K, E]`` and a router transfer ``T [K, E]``
(:mod:`moeshrink.search.fitness`). Two stages, each a population with elitism scored by inference
only, on plain text (next-token loss; each generation's leader also scored on held-out windows of the
same text, which pick the best candidate and end a stage that stops improving) or on a task:

1. **prune**: one-hot rows (``T = M``): which K experts each layer keeps. Starts from the most used
   experts plus random subsets; children take each layer's subset from one of two tournament-chosen
   parents, and a mutation swaps a kept expert for a dropped one.
2. **merge**: continuous rows, starting from the best pruning: Gaussian mutation of a fraction of the
   entries of ``M`` (rows renormalised to sum to 1) and ``T`` (kept non-negative), row-wise crossover.

With routing groups (DeepSeek) every operator stays within a group: each keeps ``keep / n_group``
experts, swaps within the group, and merges only its own experts.

A time budget covers the whole call: the clock is checked before every evaluation against a deadline
that leaves the export its reserve, and the best candidate so far is exported when it comes.

The search is seeded (every generation draws from its own generator, so a resumed search continues
exactly) and writes its state after every generation to ``state_dir``. With torch.distributed
(``torchrun``) each rank scores a slice of the population and the scores are gathered.

Export: experts are materialised through the shared surgery; ``T`` is folded into a standard router
whose rows are linear combinations of the old rows fitted by least squares in logit space
(:func:`moeshrink.methods.merging.logit_space_coefficients`). One-hot rows fold exactly; mixed rows
cannot (a softmax of a linear map is not a mixture of softmax probabilities), and
:func:`fold_error` measures how far the folded router is from the exact transfer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moeshrink.arch import GroupedFamilyAdapter
from moeshrink.engine import distributed
from moeshrink.engine.data import build_calibration, check_calibration_files
from moeshrink.engine.observers import COUNTS
from moeshrink.engine.offload import ResidentLayers
from moeshrink.engine.runner import collect_layer_stats, run_steps
from moeshrink.engine.steps import ExpertsStep, RecoverStep
from moeshrink.errors import MoeShrinkError
from moeshrink.info import describe_model
from moeshrink.io.checkpoint import checkpoint_fingerprint, load_model
from moeshrink.io.export import export_checkpoint
from moeshrink.job import (
    RECOVER_RIDGE,
    RECOVER_RIDGE_MAX,
    open_checkpoint,
    record_recovery,
    source_info,
    verify_by_default,
    versions,
)
from moeshrink.methods import get_method
from moeshrink.methods.base import ScorePruning, top_scores
from moeshrink.methods.merging import logit_space_coefficients
from moeshrink.methods.planned import PlannedExperts
from moeshrink.plan import LayerPlan, ModelPlan, NewExpert
from moeshrink.quant import refuse_quantized
from moeshrink.report.model_card import model_card
from moeshrink.search.fitness import (
    Fitness,
    RoutingComparison,
    TaskData,
    TaskFitness,
    WorkingCopy,
    build_task_data,
    build_text_split,
    one_hot_rows,
    read_items,
    resolve_task,
)
from moeshrink.surgery import apply_model_plan
from moeshrink.surgery.apply import update_config
from moeshrink.surgery.router_transfer import TRANSFER_FILENAME, group_blocks, transfer_state
from moeshrink.verify import verify_before_commit

STATE_FORMAT = "moeshrink-eep-state/1"
STATE_FILENAME = "eep_state.json"


@dataclass
class EEPSettings:
    """The search's budget and operators (all saved with the state and the plan)."""

    keep: int
    top_k: int
    population: int = 8
    elite: int = 2
    prune_iterations: int = 10
    merge_iterations: int = 20
    swap_rate: float = 0.5  # prune stage: chance per layer that a child swaps one kept expert
    merge_rate: float = 0.1  # merge stage: fraction of entries of M and T a mutation moves
    sigma: float = 0.1  # merge stage: standard deviation of that move
    merge_scope: str = "all"  # merge stage: "all" entries move, or only "dropped" experts' columns
    seed: int = 0
    objective: str = "text"  # task items: chosen on validation (docs/eep.md)
    init: tuple[str, ...] = ("frequency", "reap")  # scoring methods whose choice on the data seeds the search
    time_budget: float | None = None  # seconds for the whole call: seeding, search and export
    # generations a stage goes on without a better held-out (selection) loss before it ends (plain text)
    patience: int | None = None
    groups: int = 1  # routing groups (DeepSeek): experts are kept, and merged, within their group
    # Mean active experts per token over the MoE layers: with it, each layer's top-k (1..top_k) is
    # searched too, the total fixed (e.g. 1.5 with top-2: half the layers route to one expert).
    active_experts: float | None = None

    def check(self) -> None:
        if self.population < 2 or not 1 <= self.elite < self.population:
            raise MoeShrinkError(
                f"population must be at least 2 and elite in 1..population-1, got {self.population}/{self.elite}"
            )
        if self.prune_iterations < 1 or self.merge_iterations < 0:
            raise MoeShrinkError(
                "prune iterations must be at least 1 and merge iterations at least 0 (0: prune only)"
            )
        unknown = [m for m in self.init if not isinstance(get_method(m), ScorePruning)]
        if not self.init or unknown:
            raise MoeShrinkError(
                f"init takes scoring methods (frequency, soft_activation, reap, ean), got {list(self.init)}"
            )
        if self.merge_scope not in ("all", "dropped"):
            raise MoeShrinkError(f"merge scope must be 'all' or 'dropped', got {self.merge_scope!r}")
        if self.active_experts is not None and not 1 <= self.active_experts <= self.top_k:
            raise MoeShrinkError(
                f"active experts per token must lie in [1, top-k = {self.top_k}], got {self.active_experts}"
            )
        if self.sigma <= 0 or not 0 < self.merge_rate <= 1 or not 0 <= self.swap_rate <= 1:
            raise MoeShrinkError("sigma must be > 0, merge-rate in (0, 1] and swap-rate in [0, 1]")
        if self.time_budget is not None and self.time_budget <= 0:
            raise MoeShrinkError(
                f"--time-budget must be a positive number of seconds, got {self.time_budget}"
            )
        if self.patience is not None and self.patience < 1:
            raise MoeShrinkError(f"--patience must be at least 1 generation, got {self.patience}")


@dataclass
class Candidate:
    """Per MoE layer: merge matrix M [K, E] and router transfer T [K, E] (float64), and (when the
    search covers active experts) the layer's top-k."""

    merge: dict[int, torch.Tensor]
    transfer: dict[int, torch.Tensor]
    fitness: Fitness | None = None
    top_k: dict[int, int] | None = None

    @classmethod
    def pruning(
        cls, kept: dict[int, list[int]], num_experts: int, top_k: dict[int, int] | None = None
    ) -> Candidate:
        """One-hot rows keeping ``kept[layer]`` (sorted, like :meth:`LayerPlan.keep`), T = M."""
        merge = {}
        for i, experts in kept.items():
            m = torch.zeros(len(experts), num_experts, dtype=torch.float64)
            m[torch.arange(len(experts)), torch.tensor(sorted(experts))] = 1.0
            merge[i] = m
        return cls(merge=merge, transfer={i: m.clone() for i, m in merge.items()}, top_k=top_k)

    def routing(self, top_k: int) -> int | dict[int, int]:
        """The top-k to evaluate this candidate with: its own per layer, else the search's."""
        return self.top_k if self.top_k is not None else top_k

    def kept(self) -> dict[int, list[int]]:
        return {i: one_hot_rows(m) for i, m in self.merge.items()}

    def signature(self) -> str:
        digest = hashlib.sha1()
        for i, m in sorted(self.merge.items()):
            digest.update(f"{i}:".encode() + m.numpy().tobytes() + self.transfer[i].numpy().tobytes())
        if self.top_k is not None:
            digest.update(json.dumps(sorted(self.top_k.items())).encode())
        return digest.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "merge": {str(i): m.tolist() for i, m in self.merge.items()},
            "transfer": {str(i): t.tolist() for i, t in self.transfer.items()},
            "fitness": None if self.fitness is None else self.fitness.to_dict(),
            "top_k": None if self.top_k is None else {str(i): k for i, k in self.top_k.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Candidate:
        def tensors(d):
            return {int(i): torch.tensor(v, dtype=torch.float64) for i, v in d.items()}

        fitness = Fitness(**data["fitness"]) if data.get("fitness") else None
        top_k = {int(i): int(k) for i, k in data["top_k"].items()} if data.get("top_k") else None
        return cls(
            merge=tensors(data["merge"]), transfer=tensors(data["transfer"]), fitness=fitness, top_k=top_k
        )


# -------------------------------------------------------------------------------------- operators


def _generator(seed: int, stage: str, generation: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + (0 if stage == "prune" else 500_000) + generation)


def _random_subset(num_experts: int, keep: int, gen: torch.Generator, groups: int = 1) -> list[int]:
    """``keep`` experts at random, ``keep / groups`` from each contiguous routing group."""
    size = num_experts // groups
    kept = []
    for g in range(groups):
        kept.extend(g * size + j for j in torch.randperm(size, generator=gen)[: keep // groups].tolist())
    return sorted(kept)


def _spread_top_k(
    layers: list[int], settings: EEPSettings, gen: torch.Generator | None
) -> dict[int, int] | None:
    """Per-layer top-k summing to ``active_experts`` x layers: spread evenly (``gen`` None) or at random."""
    if settings.active_experts is None:
        return None
    total = round(settings.active_experts * len(layers))
    high = total - len(layers)  # layers routing to more than one expert, one unit each above 1
    top_k = dict.fromkeys(layers, 1)
    order = (
        layers if gen is None else [layers[j] for j in torch.randperm(len(layers), generator=gen).tolist()]
    )
    for n in range(high):
        top_k[order[n % len(order)]] += 1
    return {i: min(k, settings.top_k) for i, k in top_k.items()}


def _move_top_k(
    top_k: dict[int, int] | None, settings: EEPSettings, gen: torch.Generator
) -> dict[int, int] | None:
    """Move one active expert from one layer to another (the total stays)."""
    if top_k is None:
        return None
    down = [i for i, k in top_k.items() if k > 1]
    up = [i for i, k in top_k.items() if k < settings.top_k]
    if not down or not up:
        return dict(top_k)
    a, b = (
        down[int(torch.randint(len(down), (1,), generator=gen))],
        up[int(torch.randint(len(up), (1,), generator=gen))],
    )
    moved = dict(top_k)
    if a != b:
        moved[a] -= 1
        moved[b] += 1
    return moved


def _tournament(population: list[Candidate], gen: torch.Generator) -> Candidate:
    a, b = torch.randint(len(population), (2,), generator=gen).tolist()
    return population[min(a, b)]  # the population is sorted best first


def _prune_child(a: Candidate, b: Candidate, settings: EEPSettings, num_experts: int, gen) -> Candidate:
    kept_a, kept_b = a.kept(), b.kept()
    kept = {}
    for i in kept_a:
        chosen = list(kept_a[i] if torch.rand(1, generator=gen).item() < 0.5 else kept_b[i])
        if torch.rand(1, generator=gen).item() < settings.swap_rate:
            out = int(torch.randint(len(chosen), (1,), generator=gen))
            size = num_experts // settings.groups  # swap within the routing group of the one swapped out
            group = (
                range(num_experts)
                if settings.groups == 1
                else range(chosen[out] // size * size, (chosen[out] // size + 1) * size)
            )
            dropped = [j for j in group if j not in chosen]
            if dropped:
                chosen[out] = dropped[int(torch.randint(len(dropped), (1,), generator=gen))]
        kept[i] = sorted(chosen)
    top_k = a.top_k if torch.rand(1, generator=gen).item() < 0.5 else b.top_k
    if torch.rand(1, generator=gen).item() < settings.swap_rate:
        top_k = _move_top_k(top_k, settings, gen)
    return Candidate.pruning(kept, num_experts, top_k)


def _mutate_merge(
    c: Candidate, settings: EEPSettings, gen: torch.Generator, anchors: dict[int, list[int]]
) -> Candidate:
    """Gaussian moves of a fraction of the entries; with ``merge_scope="dropped"`` only the entries that
    bring a pruned expert into a kept one (and each row's own kept expert, in M) move."""
    merge, transfer = {}, {}
    for i in sorted(c.merge):
        m, t = c.merge[i].clone(), c.transfer[i].clone()
        allowed = group_blocks(m.shape[1], m.shape[0], settings.groups)  # never across routing groups
        if settings.merge_scope == "dropped":
            allowed[:, anchors[i]] = False
            own = allowed.clone()
            own[torch.arange(len(anchors[i])), torch.tensor(anchors[i])] = True
        else:
            own = allowed
        for x, scope in ((m, own), (t, allowed)):
            moved = torch.rand(x.shape, generator=gen, dtype=torch.float64) < settings.merge_rate
            x += (moved & scope) * torch.randn(x.shape, generator=gen, dtype=torch.float64) * settings.sigma
        total = m.sum(1, keepdim=True)
        m = torch.where(total.abs() > 1e-6, m / total, m)  # rows sum to 1: a weighted average of experts
        empty = (t.clamp(min=0).sum(1) == 0).nonzero().flatten()
        t = t.clamp(min=0)
        t[empty] = c.transfer[i][empty]  # a row with no mass left keeps its parent's row
        merge[i], transfer[i] = m, t
    return Candidate(merge=merge, transfer=transfer, top_k=c.top_k)


def _merge_child(
    a: Candidate, b: Candidate, settings: EEPSettings, gen: torch.Generator, anchors: dict[int, list[int]]
) -> Candidate:
    merge, transfer = {}, {}
    for i in sorted(a.merge):
        take_b = torch.rand(a.merge[i].shape[0], generator=gen) < 0.5
        merge[i] = torch.where(take_b[:, None], b.merge[i], a.merge[i])
        transfer[i] = torch.where(take_b[:, None], b.transfer[i], a.transfer[i])
    return _mutate_merge(Candidate(merge=merge, transfer=transfer, top_k=a.top_k), settings, gen, anchors)


# ------------------------------------------------------------------------------------------ state


@dataclass
class SearchState:
    """Everything a resumed search needs; written after every generation."""

    settings: dict[str, Any]
    identity: dict[str, Any]  # model fingerprint and fitness data hash: a state resumes only on these
    stage: str = "prune"
    generation: int = 0
    population: list[Candidate] = field(default_factory=list)
    best_prune: Candidate | None = None
    best: Candidate | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    seen: dict[str, dict] = field(default_factory=dict)  # prune-stage fitness by candidate signature
    since_improved: int = 0  # generations of this stage without a better held-out loss (plain text)
    stopped: str = ""  # why the last call ended before the iterations did ("time budget"), else ""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {
            "format": STATE_FORMAT,
            "settings": self.settings,
            "identity": self.identity,
            "stage": self.stage,
            "generation": self.generation,
            "population": [c.to_json() for c in self.population],
            "best_prune": self.best_prune.to_json() if self.best_prune else None,
            "best": self.best.to_json() if self.best else None,
            "history": self.history,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "seen": self.seen,
            "since_improved": self.since_improved,
        }
        tmp = directory / (STATE_FILENAME + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, directory / STATE_FILENAME)

    @classmethod
    def load(cls, directory: Path) -> SearchState | None:
        path = directory / STATE_FILENAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            raise MoeShrinkError(f"{path} is not an EEP search state: remove it or pick another --state-dir")

        def cand(d):
            return Candidate.from_json(d) if d else None

        return cls(
            settings=data["settings"],
            identity=data["identity"],
            stage=data["stage"],
            generation=data["generation"],
            population=[Candidate.from_json(c) for c in data["population"]],
            best_prune=cand(data["best_prune"]),
            best=cand(data["best"]),
            history=data["history"],
            evaluations=data["evaluations"],
            seconds=data["seconds"],
            seen=data["seen"],
            since_improved=data.get("since_improved", 0),
        )


# ----------------------------------------------------------------------------------------- search


@dataclass
class Clock:
    """The call's time budget as seen by the search: every evaluation must end by ``deadline``
    (``time.perf_counter()`` seconds; None: no budget), which leaves the export its reserve.
    ``per_evaluation`` is the longest evaluation so far (at first an estimate)."""

    deadline: float | None = None
    per_evaluation: float = 0.0
    evaluated: int = 0  # evaluations this call

    def allows(self) -> bool:
        """Whether one more evaluation ends before the deadline (the call's first always runs: the
        budget was checked against it before the search began)."""
        if self.deadline is None or self.evaluated == 0:
            return True
        return time.perf_counter() + self.per_evaluation <= self.deadline

    def agreed(self, allowed: bool) -> bool:
        """``allowed`` on every rank (under torchrun the ranks must stop together)."""
        if not distributed.is_active():
            return allowed
        votes: list[bool] = [True] * distributed.world_size()
        dist.all_gather_object(votes, allowed)
        return all(votes)

    def timed(self, evaluate: Any) -> Any:
        start = time.perf_counter()
        out = evaluate()
        self.per_evaluation = max(self.per_evaluation, time.perf_counter() - start)
        self.evaluated += 1
        return out


def _evaluate(
    population: list[Candidate], fitness: TaskFitness, top_k: int, state: SearchState, clock: Clock
) -> tuple[int, bool]:
    """Score the unscored candidates; with torch.distributed each rank scores every world-th one.
    Returns the evaluations made and whether the time budget stopped them (the candidates left then
    keep ``fitness`` None)."""
    todo = [n for n, c in enumerate(population) if c.fitness is None and c.signature() not in state.seen]
    mine: dict[int, dict] = {}
    out_of_time = False
    for position, n in enumerate(todo):
        if position % distributed.world_size() == distributed.rank():
            if not clock.allows():
                out_of_time = True
                break
            c = population[n]
            mine[n] = clock.timed(
                lambda c=c: fitness.evaluate(c.merge, c.transfer, c.routing(top_k))
            ).to_dict()
    if distributed.is_active():
        parts: list[tuple[dict, bool]] = [({}, False) for _ in range(distributed.world_size())]
        dist.all_gather_object(parts, (mine, out_of_time))
        mine = {n: f for part, _ in parts for n, f in part.items()}
        out_of_time = any(stopped for _, stopped in parts)
    for n, c in enumerate(population):
        if c.fitness is None:
            if n in mine:
                c.fitness = Fitness(**mine[n])
            elif c.signature() in state.seen:
                c.fitness = Fitness(**state.seen[c.signature()])
            else:
                continue  # not scored: the time budget ran out first
            if state.stage == "prune":
                state.seen[c.signature()] = c.fitness.to_dict()
    return len(mine), out_of_time


def _select(
    candidate: Candidate, selection: TaskFitness | None, top_k: int, state: SearchState, clock: Clock
) -> bool:
    """Score ``candidate`` on the held-out selection text (once); False when the budget has no time left."""
    if selection is None or candidate.fitness.selection is not None:
        return True
    if not clock.agreed(clock.allows()):
        return False
    c = candidate
    scored = clock.timed(lambda: selection.evaluate(c.merge, c.transfer, c.routing(top_k)))
    c.fitness = replace(c.fitness, selection=scored.nll)
    state.evaluations += 1
    if state.stage == "prune":
        state.seen[c.signature()] = c.fitness.to_dict()
    return True


def run_search(
    fitness: TaskFitness,
    settings: EEPSettings,
    initial: list[dict[int, list[int]]],
    num_experts: int,
    *,
    state: SearchState,
    state_dir: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    selection: TaskFitness | None = None,
    clock: Clock | None = None,
) -> SearchState:
    """Run (or continue) the two stages until their iterations are spent, a stage's held-out loss
    stops improving (``settings.patience``) or the clock's deadline comes.

    ``initial`` seeds the prune population (e.g. the most used experts per layer; the rest is random).
    With ``selection`` (held-out text) each generation's leader is also scored there, and that score
    picks the best candidate and drives early stopping. ``stop_after`` ends this call after that many
    generations (the state stays resumable). When the deadline comes inside a generation, the state
    stays as the last complete generation left it (a resumed call with more time goes on from there)."""
    clock = clock or Clock()
    total = settings.prune_iterations + settings.merge_iterations
    done_before = state.generation + (settings.prune_iterations if state.stage == "merge" else 0)
    bar = tqdm(total=total, initial=done_before, desc="eep", unit="gen", disable=not progress)
    generations = 0
    state.stopped = ""
    while state.stage != "done":
        if stop_after is not None and generations >= stop_after:
            break
        start = time.perf_counter()
        gen = _generator(settings.seed, state.stage, state.generation)
        if not state.population:
            state.population = _initial_population(state, settings, initial, num_experts, gen)
        evaluated, out_of_time = _evaluate(state.population, fitness, settings.top_k, state, clock)
        state.evaluations += evaluated
        ranked = sorted(
            (c for c in state.population if c.fitness is not None), key=lambda c: -c.fitness.value
        )
        leader = ranked[0] if ranked else None
        if out_of_time or leader is None or not _select(leader, selection, settings.top_k, state, clock):
            if state.best is None and leader is not None:  # nothing better to export than this
                state.best = leader
                state.best_prune = state.best_prune or leader
            state.seconds += time.perf_counter() - start
            state.stopped = "time budget"
            break
        state.population.sort(key=lambda c: -c.fitness.value)  # stable: ties keep their order
        before = state.best_prune if state.stage == "prune" else state.best
        improved = before is None or leader.fitness.chosen > before.fitness.chosen
        if state.best is None or leader.fitness.chosen > state.best.fitness.chosen:
            state.best = leader
        if state.stage == "prune" and improved:
            state.best_prune = leader
        state.since_improved = 0 if improved else state.since_improved + 1
        state.seconds += time.perf_counter() - start
        state.history.append(
            {
                "stage": state.stage,
                "generation": state.generation,
                "evaluations": evaluated,
                "best": state.best.fitness.to_dict(),
                "seconds": state.seconds,
            }
        )
        state.generation += 1
        limit = settings.prune_iterations if state.stage == "prune" else settings.merge_iterations
        patience_over = settings.patience is not None and state.since_improved >= settings.patience
        if state.generation >= limit or patience_over:
            if patience_over:
                state.history[-1]["early_stop"] = True
            state.stage = "merge" if state.stage == "prune" and settings.merge_iterations > 0 else "done"
            state.generation, state.population, state.since_improved = 0, [], 0
        else:
            state.population = _next_population(state, settings, num_experts, gen)
        generations += 1
        bar.update(1)
        bar.set_postfix_str(state.best.fitness.label())
        if state_dir is not None and distributed.rank() == 0:
            state.save(state_dir)
    bar.close()
    distributed.barrier()
    return state


def _initial_population(
    state: SearchState, settings: EEPSettings, initial: list[dict[int, list[int]]], num_experts: int, gen
) -> list[Candidate]:
    if state.stage == "prune":
        population = []
        layers = sorted(initial[0])
        for kept in initial:
            c = Candidate.pruning(kept, num_experts, _spread_top_k(layers, settings, None))
            if c.signature() not in {p.signature() for p in population}:
                population.append(c)
        population = population[: settings.population]
        while len(population) < settings.population:
            population.append(
                Candidate.pruning(
                    {i: _random_subset(num_experts, settings.keep, gen, settings.groups) for i in initial[0]},
                    num_experts,
                    _spread_top_k(layers, settings, gen),
                )
            )
        return population
    start = state.best_prune
    population = [Candidate(start.merge, start.transfer, start.fitness, start.top_k)]
    while len(population) < settings.population:
        population.append(_mutate_merge(start, settings, gen, start.kept()))
    return population


def _next_population(state: SearchState, settings: EEPSettings, num_experts: int, gen) -> list[Candidate]:
    population = state.population[: settings.elite]
    signatures = {c.signature() for c in population}
    attempts = 0
    while len(population) < settings.population:
        a, b = _tournament(state.population, gen), _tournament(state.population, gen)
        if state.stage == "prune":
            child = _prune_child(a, b, settings, num_experts, gen)
            attempts += 1
            if (child.signature() in signatures or child.signature() in state.seen) and attempts < 50:
                continue  # already scored: draw another
        else:
            child = _merge_child(a, b, settings, gen, state.best_prune.kept())
        signatures.add(child.signature())
        population.append(child)
    return population


# ----------------------------------------------------------------------------------------- export


def fold_router(
    candidate: Candidate, fitness: TaskFitness, top_k: int
) -> tuple[dict[int, torch.Tensor], list[LayerPlan]]:
    """Layer plans with the transfer folded into standard router rows, and those rows as [K, E]
    coefficient matrices. One-hot rows are plain copies; mixed rows are fitted on the router logits the
    candidate's layers see on the fitness data."""
    layers = fitness.working.layers
    needs_fit = any(one_hot_rows(t) is None for t in candidate.transfer.values())
    logits = (
        fitness.record_logits(candidate.merge, candidate.transfer, candidate.routing(top_k))
        if needs_fit
        else {}
    )
    coefficients, plans = {}, []
    for i in sorted(candidate.merge):
        m, t = candidate.merge[i], candidate.transfer[i]
        c = torch.zeros_like(t)
        experts = []
        for row in range(m.shape[0]):
            members = torch.nonzero(t[row]).flatten().tolist()
            if len(members) == 1 and t[row, members[0]] == 1:
                c[row, members[0]] = 1.0
            else:
                coeffs = logit_space_coefficients(layers[i], logits[i], members, t[row, members].tolist())
                c[row, members] = torch.tensor(coeffs, dtype=c.dtype)
            sources = sorted(set(torch.nonzero(m[row]).flatten().tolist()) | set(members))
            kept = one_hot_rows(m[row : row + 1])
            if kept is not None and kept == one_hot_rows(t[row : row + 1]):
                experts.append(NewExpert.keep(kept[0]))
            else:
                experts.append(
                    NewExpert(
                        sources=sources,
                        weights=[float(m[row, s]) for s in sources],
                        router_weights=[float(c[row, s]) for s in sources],
                    )
                )
        coefficients[i] = c
        layer_top_k = candidate.top_k[i] if candidate.top_k and candidate.top_k[i] != top_k else None
        plans.append(LayerPlan(layer=i, num_experts_before=m.shape[1], experts=experts, top_k=layer_top_k))
    return coefficients, plans


def fold_error(
    candidate: Candidate,
    coefficients: dict[int, torch.Tensor],
    working: WorkingCopy,
    windows: torch.Tensor,
    top_k: int,
) -> dict[int, dict[str, float]]:
    """Per MoE layer, on ``windows`` (held-out token windows) run through the exact-transfer model
    (``working`` wraps an unmodified model): the share of tokens for which the folded router picks the
    same experts, and the mean total variation distance between the two routers' weights over the K
    experts, both on the same layer inputs."""
    working.compare = {i: (c, RoutingComparison()) for i, c in coefficients.items()}
    try:
        with working.applied(candidate.merge, candidate.transfer, candidate.routing(top_k)), torch.no_grad():
            for start in range(0, windows.shape[0], 8):
                working.model(input_ids=windows[start : start + 8])
        return {i: acc.to_dict() for i, (_, acc) in working.compare.items()}
    finally:
        working.compare = None


@dataclass
class SearchResult:
    """The searched plan, the exported model in memory and what the search cost."""

    plan: ModelPlan
    prune_plan: ModelPlan
    model: Any
    tokenizer: Any
    state: SearchState
    best: Candidate
    best_prune: Candidate
    coefficients: dict[int, torch.Tensor]  # the best candidate's folded router rows [K, E] per layer
    task_data: TaskData
    seconds: dict[str, float]
    output: Path | None = None

    @property
    def evaluations_per_second(self) -> float:
        return self.state.evaluations / max(self.state.seconds, 1e-9)


def _seeds(model, adapter, fitness: TaskFitness, settings: EEPSettings) -> list[dict[int, list[int]]]:
    """The experts each ``settings.init`` method keeps, scored on the task's own text (unmodified model)."""
    methods = [get_method(name) for name in settings.init]
    needs = frozenset({COUNTS}).union(*(m.needs for m in methods))
    stats = collect_layer_stats(model, adapter, fitness.task_text(), needs, progress=False)
    layers = fitness.working.layers
    return [
        {i: top_scores(m.score(layers[i], s), settings.keep, settings.groups) for i, s in stats.items()}
        for m in methods
    ]


# A fresh process that imports torch and transformers, for the output's verification (measured on a
# 2-core machine: 8 s; the reserve takes twice that).
VERIFY_STARTUP_SECONDS = 16.0


def export_reserve(load_seconds: float, evaluation_seconds: float, verify: bool) -> float:
    """Seconds to keep for the export out of a time budget: folding the router (at most one evaluation),
    writing the weights (about what reading them took), and, when the output is verified, a fresh
    process that loads them again."""
    reserve = evaluation_seconds + load_seconds
    if verify:
        reserve += VERIFY_STARTUP_SECONDS + load_seconds
    return reserve


def search(
    model: str | Path,
    task: str | Path | None = None,
    *,
    keep: int,
    calib: Sequence[str | Path] | None = None,
    samples: int = 8,
    select_samples: int = 16,
    seq_len: int = 256,
    patience: int | None = 3,
    top_k: int | None = None,
    items: int = 100,
    population: int = 8,
    elite: int = 2,
    prune_iterations: int = 10,
    merge_iterations: int = 20,
    sigma: float = 0.1,
    merge_rate: float = 0.1,
    swap_rate: float = 0.5,
    merge_scope: str = "all",
    seed: int = 0,
    objective: str = "text",
    init: Sequence[str] = ("frequency", "reap"),
    time_budget: float | None = None,
    state_dir: str | Path | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    exact_router: bool = False,
    active_experts: float | None = None,
    batch_size: int = 32,
    dtype: str = "auto",
    stop_after: int | None = None,
    progress: bool = True,
    verify: bool | None = None,
    revision: str | None = None,
    started: float | None = None,
    recover: bool = False,
    recover_ridge: float | None = None,
    recover_samples: int = 64,
) -> SearchResult:
    """EEP on the checkpoint at ``model``: keep ``keep`` experts per MoE layer with ``top_k`` active,
    and (with ``output``) export the best candidate with a standard router.

    Fitness data: plain text (``calib``: text / JSONL files; the fitness is the candidate model's mean
    next-token loss on ``samples`` windows of ``seq_len`` tokens, and the best candidate is chosen, and
    each stage stopped after ``patience`` generations without progress, by the loss on
    ``select_samples`` held-out windows of the same text), or the first ``items`` items of ``task`` (a
    local task name or multiple-choice JSONL; the fitness is ``objective``, no held-out selection).

    ``time_budget`` bounds the whole call (loading, seeding, search and export): the search checks the
    clock before every evaluation, keeps a reserve for the export, and exports the best candidate so
    far when time runs out; a budget that cannot fit one evaluation is refused before the search.
    ``merge_iterations=0`` is the prune-only search. With ``state_dir`` the search resumes from the
    state it finds there. Under torchrun every rank scores its slice of each generation. With
    ``exact_router`` the export also carries the exact router transfer
    (:mod:`moeshrink.surgery.router_transfer`), which ``moeshrink.load_model`` and ``moeshrink eval``
    route by; the standard weights keep the folded router for transformers and vLLM. DeepSeek's
    grouped routing is searched within its groups: every group keeps ``keep / n_group`` experts and
    merges only its own. ``started`` is the ``time.perf_counter()`` the budget counts from (default:
    this call's start; the command line passes its own start, imports included).

    ``recover`` (plain text only) runs the recovery step (:mod:`moeshrink.surgery.recover`, ridge
    ``recover_ridge``) on the best candidate before the export, fitted on ``recover_samples`` windows
    of the text drawn as ``moeshrink prune`` draws its calibration; the time budget reserves for it."""
    started = time.perf_counter() if started is None else started
    if (task is None) == (calib is None):
        raise MoeShrinkError(
            "give the search's data: --calib FILE... (plain text) or --task (multiple-choice items), not both"
        )
    if recover_ridge is not None and not recover:
        raise MoeShrinkError("--recover-ridge sets the recover step's ridge: add --recover")
    if recover and calib is None:
        raise MoeShrinkError(
            "--recover fits on calibration text: search with --calib FILE (a task's items are not calibration text)"
        )
    ridge = RECOVER_RIDGE if recover_ridge is None else float(recover_ridge)
    if recover and not 0 < ridge <= RECOVER_RIDGE_MAX:
        raise MoeShrinkError(f"--recover-ridge must be in (0, {RECOVER_RIDGE_MAX:g}], got {ridge:g}")
    path, config, adapter = open_checkpoint(model, output, overwrite, revision)
    refuse_quantized(path, "moeshrink search")
    num_experts = adapter.num_experts(config)
    top_k = int(top_k or config.num_experts_per_tok)
    adapter.check_budget(config, keep, top_k)
    groups = GroupedFamilyAdapter.num_groups(config) if isinstance(adapter, GroupedFamilyAdapter) else 1
    text = calib is not None
    settings = EEPSettings(
        keep=keep,
        top_k=top_k,
        population=population,
        elite=elite,
        prune_iterations=prune_iterations,
        merge_iterations=merge_iterations,
        swap_rate=swap_rate,
        merge_rate=merge_rate,
        sigma=sigma,
        merge_scope=merge_scope,
        seed=seed,
        objective="text" if text else objective,
        init=tuple(init),
        time_budget=time_budget,
        active_experts=active_experts,
        patience=patience if text else None,
        groups=groups,
    )
    settings.check()
    if text:
        check_calibration_files(list(calib))
    else:
        task_path = resolve_task(task)
        task_items = read_items(task_path, 0, items)
    if distributed.launched_distributed():
        distributed.init_distributed("cpu")

    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load_model(path, dtype)
    timings["load"] = time.perf_counter() - t
    if loaded.tokenizer is None:
        raise MoeShrinkError(f"{path} has no tokenizer files; the search's data needs the model's tokenizer")
    model_, tokenizer = loaded.model, loaded.tokenizer
    if text:
        data, select_data = build_text_split(
            tokenizer, list(calib), samples=samples, select_samples=select_samples, seq_len=seq_len, seed=seed
        )
    else:
        data, select_data = (
            build_task_data(
                tokenizer, task_items, {"files": [str(task_path)], "first_items": items, "seed": seed}
            ),
            None,
        )
    recovery_ids = (
        build_calibration(tokenizer, list(calib), recover_samples, seq_len, seed).input_ids
        if recover
        else None
    )
    before = describe_model(model_, adapter)
    fitness = TaskFitness(model_, adapter, data, objective=settings.objective, batch_size=batch_size)
    selection = (
        TaskFitness(
            model_, adapter, select_data, objective="text", batch_size=batch_size, working=fitness.working
        )
        if select_data is not None
        else None
    )
    timings["prepare"] = time.perf_counter() - t

    identity = {"fingerprint": checkpoint_fingerprint(path), "data": data.info["sha256"]}
    if select_data is not None:
        identity["selection"] = select_data.info["sha256"]
    directory = Path(state_dir) if state_dir is not None else None
    state = SearchState.load(directory) if directory is not None else None
    settings_dict = json.loads(json.dumps(asdict(settings)))  # as a saved state reads it back
    if state is not None:
        if state.identity != identity or _budgetless(state.settings) != _budgetless(settings_dict):
            raise MoeShrinkError(
                f"{directory / STATE_FILENAME} belongs to another search (model, data or settings "
                "differ): pick another --state-dir or remove it"
            )
        state.settings = settings_dict
    else:
        state = SearchState(settings=settings_dict, identity=identity)

    t = time.perf_counter()
    initial = _seeds(model_, adapter, fitness, settings)
    timings["seed"] = time.perf_counter() - t
    check = verify_by_default() if verify is None else verify
    # one evaluation runs the fitness tokens through the MoE layers, as seeding just did
    clock = Clock(per_evaluation=timings["seed"])
    reserve = export_reserve(timings["load"], timings["seed"], check and output is not None)
    if recovery_ids is not None:  # recovery: about 8 forward passes of its tokens (docs/recovery.md)
        reserve += 8 * timings["seed"] * recovery_ids.shape[0] / data.input_ids.shape[0]
    if time_budget is not None:
        clock.deadline = started + time_budget - reserve
        spent = time.perf_counter() - started
        if spent + timings["seed"] > time_budget - reserve:
            raise MoeShrinkError(
                f"--time-budget {time_budget:g}s is too short: loading and seeding took {spent:.1f}s, one "
                f"evaluation takes about {timings['seed']:.1f}s and the export needs about {reserve:.1f}s; "
                f"give at least {spent + 3 * timings['seed'] + reserve:.0f}s (or fewer --samples)"
            )
    t = time.perf_counter()
    state = run_search(
        fitness,
        settings,
        initial,
        num_experts,
        state=state,
        state_dir=directory,
        progress=progress and distributed.rank() == 0,
        stop_after=stop_after,
        selection=selection,
        clock=clock,
    )
    timings["search"] = time.perf_counter() - t

    t = time.perf_counter()
    best, best_prune = state.best, state.best_prune
    source = source_info(path, adapter, config)
    budget_record = {
        "time_budget": time_budget,
        "export_reserve": round(reserve, 3),
        "seconds_before_export": round(time.perf_counter() - started, 3),
        "stopped": state.stopped or ("early stopping" if _stopped_early(state) else "completed"),
        "generations": len(state.history),
    }

    def plan_of(candidate: Candidate, label: str) -> tuple[dict[int, torch.Tensor], ModelPlan]:
        coefficients, layer_plans = fold_router(candidate, fitness, top_k)
        return coefficients, ModelPlan(
            method="eep",
            method_options=settings_dict
            | {
                "stage": label,
                "fitness": candidate.fitness.to_dict(),
                "evaluations": state.evaluations,
                "search_seconds": round(state.seconds, 3),
                "run": budget_record,
            },
            budget={"keep": keep},
            top_k=top_k,
            source=source,
            calibration=data.info
            | ({"selection": select_data.info} if select_data is not None else {})
            | {"processes": distributed.world_size()},
            versions=versions(),
            layers=layer_plans,
        )

    (coefficients, plan), (_, prune_plan) = plan_of(best, "prune+merge"), plan_of(best_prune, "prune")
    fitness.working.restore()  # the model is the original again; from here on it is the exported one
    sidecars = {}
    if exact_router:
        routers = {i: dict(layer.router_tensors()) for i, layer in fitness.working.layers.items()}
        sidecars[TRANSFER_FILENAME] = transfer_state(routers, best.transfer)
        plan.method_options["exact_router"] = TRANSFER_FILENAME
    if recovery_ids is None:
        apply_model_plan(model_, adapter, plan)
    else:  # the plan as the experts step, then the recover step, in one pass over the layers
        per_layer = {lp.layer: lp.num_experts_after for lp in plan.layers}
        steps = [
            ExpertsStep(method=PlannedExperts(plan), per_layer=per_layer, top_k=top_k),
            RecoverStep(ridge=ridge),
        ]
        done, records = run_steps(
            ResidentLayers(model_, adapter), steps, recovery_ids, batch_size=8, progress=progress
        )
        plan.recovery = record_recovery(plan.layers, done[1], records[1])
        plan.calibration["recovery"] = {"samples": recover_samples, "seq_len": seq_len, "seed": seed}
        top_ks = {lp.layer: lp.top_k or plan.top_k for lp in plan.layers}
        update_config(model_, adapter, per_layer, top_ks)
    timings["fold"] = time.perf_counter() - t
    result = SearchResult(
        plan=plan,
        prune_plan=prune_plan,
        model=model_,
        tokenizer=tokenizer,
        state=state,
        best=best,
        best_prune=best_prune,
        coefficients=coefficients,
        task_data=data,
        seconds=timings,
    )
    if output is not None:
        if distributed.rank() == 0:
            after = describe_model(model_, adapter)
            name = Path(output).name

            def card(plan: ModelPlan) -> str:
                return model_card(plan, before, after, name)

            export_checkpoint(
                model_,
                adapter,
                plan,
                output,
                source=path,
                tokenizer=tokenizer,
                model_card=card(plan),
                overwrite=overwrite,
                sidecars=sidecars,
                before_commit=verify_before_commit(plan, card, model_, progress=progress) if check else None,
            )
        distributed.barrier()
        result.output = Path(output)
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    return result


def _stopped_early(state: SearchState) -> bool:
    return any(h.get("early_stop") for h in state.history)


def _budgetless(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings that must match for a state to resume (only the time budget may change)."""
    return {k: v for k, v in settings.items() if k != "time_budget"}
