"""Fitness of EEP candidates from inference only, on the resident model.

A candidate gives every MoE layer a merge matrix ``M [K, E]`` (new expert i = sum_j M_ij * old expert
j) and a router transfer ``T [K, E]`` (new expert i receives routing probability sum_j T_ij * p_j(x)).
:class:`WorkingCopy` writes a candidate into the loaded model in place (the experts through the shared
surgery, the router as the exact transfer over the untouched original router) and puts the original
tensors back afterwards, so no candidate reloads anything. :class:`TaskFitness` scores a candidate on
multiple-choice items (``{"context", "choices", "gold"}`` JSONL, as :mod:`moeshrink.evaluate.tasks`
writes them) the way lm-eval's ``acc`` does, starting from cached inputs of the first MoE layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeshrink.arch import FamilyAdapter, MoELayer
from moeshrink.engine.data import read_documents, tokenize_documents
from moeshrink.engine.runner import capture_layer_inputs, move_to_device, run_layer
from moeshrink.errors import MoeShrinkError
from moeshrink.evaluate.tasks import known_tasks
from moeshrink.plan import LayerPlan, NewExpert
from moeshrink.surgery import RouteFn, RouterState, apply_layer_plan, install_router
from moeshrink.surgery.router_transfer import RouterView, one_hot_rows, transfer_route
from moeshrink.surgery.router_transfer import transfer_logits as transfer_logits  # imported from here too

# Router logits kept per MoE layer when recording (for fitting the exported router rows).
MAX_RECORDED_TOKENS = 16384


# ----------------------------------------------------------------------------------- candidates


def expert_rows(layer_index: int, merge: torch.Tensor) -> LayerPlan:
    """The experts of a candidate layer as a plan (router rows left as the merge rows: the working copy
    routes with the exact transfer, and export fits the router rows separately)."""
    experts = []
    for row in merge:
        kept = one_hot_rows(row[None])
        if kept is not None:
            experts.append(NewExpert.keep(kept[0]))
            continue
        sources = torch.nonzero(row).flatten().tolist()
        weights = [float(row[s]) for s in sources]
        experts.append(NewExpert(sources=sources, weights=weights, router_weights=weights))
    return LayerPlan(layer=layer_index, num_experts_before=merge.shape[1], experts=experts)


@dataclass
class RoutingComparison:
    """Exact router transfer vs the exported (folded) router, on the same layer inputs."""

    tokens: int = 0
    same_experts: int = 0  # tokens whose set of chosen experts is the same
    total_variation: float = 0.0  # sum over tokens of 1/2 |w_exact - w_fold|_1 over the K experts

    def to_dict(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "same_experts": self.same_experts / n,
            "total_variation": self.total_variation / n,
        }


def _dense(weights: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(weights.shape[0], k).scatter_add_(1, index.long(), weights.float())


class WorkingCopy:
    """Writes candidates into the resident model's MoE layers in place and restores the original.

    The original expert and router tensors are kept (the model's own objects, no copies); a candidate
    replaces a layer's expert tensors with merged ones and installs a router rule
    (:func:`~moeshrink.surgery.router.install_router`): the original router computes the E logits, the
    transfer turns them into K, the family's scoring rule routes them.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.model, self.adapter = model, adapter
        self.layers = {layer.index: layer for layer in adapter.moe_layers(model)}
        self._experts = {
            i: {s.name: layer.param(s.name) for s in layer.expert_tensors} for i, layer in self.layers.items()
        }
        self._routers = {i: RouterState.save(layer) for i, layer in self.layers.items()}
        self.valid: torch.Tensor | None = None  # [tokens] mask of real (unpadded) tokens when recording
        self.recorded: dict[int, list[torch.Tensor]] = {}
        self.compare: dict[int, tuple[torch.Tensor, RoutingComparison]] | None = None
        self.active = False

    def restore(self) -> None:
        """Put the original tensors, expert counts, top-k and router back."""
        for i, layer in self.layers.items():
            for name, tensor in self._experts[i].items():
                setattr(layer.experts, name, tensor)
            self._routers[i].restore()
        self.active = False

    def apply(
        self, merge: dict[int, torch.Tensor], transfer: dict[int, torch.Tensor], top_k: int | dict[int, int]
    ) -> None:
        """Write a candidate (per MoE layer ``M``, ``T``, and top-k: one or per layer) into the model,
        replacing any earlier one."""
        self.restore()
        per_layer = top_k if isinstance(top_k, dict) else dict.fromkeys(self.layers, top_k)
        for i, layer in self.layers.items():
            apply_layer_plan(layer, expert_rows(i, merge[i]))
            saved = self._routers[i]
            saved.restore_rows()  # the router stays the original one: it computes the E logits
            install_router(
                layer,
                self._route(layer, transfer[i], per_layer[i]),
                top_k=per_layer[i],
                source_top_k=saved.top_k[layer.router],  # the original router scores all E experts
            )
        self.active = True

    def _route(self, layer: MoELayer, transfer: torch.Tensor, top_k: int) -> RouteFn:
        exact = transfer_route(
            layer, transfer, self._routers[layer.index].tensors.get("e_score_correction_bias")
        )

        def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            new_logits, new_weights, new_index = exact(logits)
            self._observe(layer.index, logits, new_weights, new_index, top_k)
            return new_logits, new_weights, new_index

        return route

    def _observe(self, index: int, logits, weights, chosen, top_k: int) -> None:
        valid = self.valid if self.valid is not None else slice(None)
        if index in self.recorded:
            have = sum(t.shape[0] for t in self.recorded[index])
            if have < MAX_RECORDED_TOKENS:
                self.recorded[index].append(
                    logits.detach()[valid].float().cpu()[: MAX_RECORDED_TOKENS - have]
                )
        if self.compare is not None and index in self.compare:
            coefficients, acc = self.compare[index]
            fold_logits = logits.float()[valid] @ coefficients.float().T
            layer = self.layers[index]
            bias = self._routers[index].tensors.get("e_score_correction_bias")
            # the exported router's rows (bias too) are these coefficients' combinations of the old ones
            router = (
                layer.router
                if bias is None
                else RouterView(layer.router, e_score_correction_bias=coefficients.float() @ bias.float())
            )
            fold_weights, fold_index = layer.scoring(router, fold_logits, None)
            k = coefficients.shape[0]
            exact = _dense(weights[valid], chosen[valid], k)
            fold = _dense(fold_weights, fold_index, k)
            acc.tokens += exact.shape[0]
            acc.same_experts += int(((exact > 0) == (fold > 0)).all(1).sum())
            acc.total_variation += float(0.5 * (exact - fold).abs().sum())

    @contextmanager
    def applied(
        self, merge: dict[int, torch.Tensor], transfer: dict[int, torch.Tensor], top_k: int | dict[int, int]
    ) -> Iterator[None]:
        self.apply(merge, transfer, top_k)
        try:
            yield
        finally:
            self.restore()


# ------------------------------------------------------------------------------------ task data


def resolve_task(task: str | Path) -> Path:
    """A task JSONL path from a local task name (``moeshrink_wiki``) or a path."""
    path = Path(task)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise MoeShrinkError(f"task file not found: {path}")
        return path
    local = known_tasks()
    if str(task) in local:
        return local[str(task)]
    raise MoeShrinkError(
        f"unknown task {task!r}: give a multiple-choice JSONL file or one of {', '.join(local) or 'none'}"
    )


def read_items(path: Path, start: int = 0, stop: int | None = None) -> list[dict]:
    """Items ``start:stop`` of a multiple-choice JSONL file (context, choices, gold)."""
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][start:stop]
    if not items:
        raise MoeShrinkError(f"{path}: no items in range {start}:{stop}; give a longer task file")
    for n, item in enumerate(items):
        if not {"context", "choices", "gold"} <= item.keys():
            raise MoeShrinkError(f"{path}: item {start + n} lacks context/choices/gold")
    return items


@dataclass
class TaskData:
    """Multiple-choice items as right-padded sequences ``context + " " + choice``, one per choice."""

    input_ids: torch.Tensor  # [N, L]
    lengths: torch.Tensor  # [N] real tokens per sequence
    starts: torch.Tensor  # [N] index of the first continuation token
    gold: torch.Tensor  # [items]
    choices: torch.Tensor  # [items] sequences per item (rows of input_ids in order)
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def build_task_data(tokenizer, items: list[dict], info: dict | None = None) -> TaskData:
    """Tokenise as lm-eval does for ``acc``: the continuation is ``tok(context + " " + choice)`` after
    the tokens of ``tok(context)``."""
    sequences, starts = [], []
    for item in items:
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            if len(whole) <= len(context):
                raise MoeShrinkError("a task choice tokenises to nothing: check the task file")
            sequences.append(whole)
            starts.append(max(len(context), 1))
    longest = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long)
    for n, s in enumerate(sequences):
        ids[n, : len(s)] = torch.tensor(s)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return TaskData(
        input_ids=ids,
        lengths=torch.tensor([len(s) for s in sequences]),
        starts=torch.tensor(starts),
        gold=torch.tensor([int(item["gold"]) for item in items]),
        choices=torch.tensor([len(item["choices"]) for item in items]),
        info=(info or {})
        | {"items": len(items), "samples": len(sequences), "seq_len": longest, "sha256": digest},
    )


def windows_as_items(windows: torch.Tensor, info: dict | None = None) -> TaskData:
    """Token windows ``[n, L]`` as one-choice items whose continuation is the whole window after its
    first token: the fitness of such data is the mean next-token loss over every window token."""
    n, length = windows.shape
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return TaskData(
        input_ids=windows.clone(),
        lengths=torch.full((n,), length),
        starts=torch.ones(n, dtype=torch.long),
        gold=torch.zeros(n, dtype=torch.long),
        choices=torch.ones(n, dtype=torch.long),
        info=(info or {}) | {"items": n, "samples": n, "seq_len": length, "sha256": digest},
    )


def build_text_split(
    tokenizer,
    paths: Sequence[str | Path],
    *,
    samples: int,
    select_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> tuple[TaskData, TaskData]:
    """Plain calibration text as EEP fitness data and held-out selection data: the text (read and
    tokenised as :func:`moeshrink.engine.data.build_calibration` does) is cut into windows of
    ``seq_len`` tokens; the last ``select_samples`` windows are the selection text, and ``samples``
    windows drawn (seeded) from the ones before are the fitness text, so the two never share a token."""
    if samples < 1 or select_samples < 1 or seq_len < 2:
        raise MoeShrinkError(
            f"need --samples >= 1, --select-samples >= 1 and --seq-len >= 2, got {samples}, "
            f"{select_samples}, {seq_len}"
        )
    stream = tokenize_documents(tokenizer, read_documents(paths, text_field))
    windows = stream.numel() // seq_len
    needed = samples + select_samples
    if windows < needed:
        raise MoeShrinkError(
            f"calibration text too short for the fitness/selection split: {stream.numel()} tokens make "
            f"{windows} windows of {seq_len}, and {samples} fitness + {select_samples} selection windows "
            f"need {needed * seq_len} tokens; give more text or lower --samples / --select-samples / --seq-len"
        )
    cut = stream[: windows * seq_len].view(windows, seq_len)
    pool = windows - select_samples
    chosen = torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    info = {
        "files": [str(p) for p in paths],
        "text_field": text_field,
        "seed": seed,
        "tokens_available": int(stream.numel()),
    }
    fit = windows_as_items(cut[chosen].contiguous(), info | {"part": "fitness"})
    select = windows_as_items(cut[pool:].contiguous(), info | {"part": "selection"})
    return fit, select


@dataclass(frozen=True)
class Fitness:
    """What one candidate scored: ``value`` (higher is better) is what the search maximises.

    On plain text (:func:`build_text_split`) ``accuracy`` is None and ``nll`` = ``text_nll`` is the mean
    next-token loss of the fitness windows; ``selection`` is the mean next-token loss on the held-out
    selection windows, scored for the generations' leaders only (None until then)."""

    value: float
    accuracy: float | None
    nll: float  # mean negative log-likelihood per gold-continuation token
    text_nll: float  # the same over every token of the items' text (context + gold continuation)
    selection: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        out = {"value": self.value, "accuracy": self.accuracy, "nll": self.nll, "text_nll": self.text_nll}
        return out | ({"selection": self.selection} if self.selection is not None else {})

    @property
    def chosen(self) -> float:
        """What picks the search's best candidate (higher is better): minus the held-out loss where it
        was scored, else the fitness value."""
        return -self.selection if self.selection is not None else self.value

    def label(self) -> str:
        """A short line for progress bars and logs."""
        parts = [] if self.accuracy is None else [f"acc {self.accuracy:.3f}"]
        parts.append(f"nll {self.nll:.3f}")
        if self.selection is not None:
            parts.append(f"held-out {self.selection:.3f}")
        return " ".join(parts)


# accuracy (ties broken by the gold continuations' loss), the gold continuations' loss, or the loss
# over the items' whole text (contexts too: several times more tokens, the same forward passes)
OBJECTIVES = ("accuracy", "loss", "text")


class TaskFitness:
    """Scores candidates on task items; the inputs of the first MoE layer are computed once."""

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        data: TaskData,
        *,
        objective: str = "accuracy",
        batch_size: int = 32,
        working: WorkingCopy | None = None,
    ):
        if objective not in OBJECTIVES:
            raise MoeShrinkError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.model, self.adapter, self.data, self.objective = model, adapter, data, objective
        # a second fitness on the same model (the held-out selection text) shares the working copy
        self.working = working if working is not None else WorkingCopy(model, adapter)
        self.first = min(self.working.layers)
        self.batch_size = batch_size
        device = next(model.parameters()).device
        layers = adapter.decoder_layers(model)
        # batches of similar lengths, each cut to its longest sequence (less padding to run)
        order = torch.argsort(data.lengths, descending=True, stable=True)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, list[dict]]] = []
        for start in range(0, order.numel(), batch_size):
            rows = order[start : start + batch_size]
            ids = data.input_ids[rows, : int(data.lengths[rows].max())]
            cached = capture_layer_inputs(model, adapter, ids, ids.shape[0], device)
            hidden = cached.hidden
            with torch.no_grad():
                for i in range(self.first):  # dense layers before the first MoE layer never change
                    hidden = run_layer(layers[i], hidden, cached.layer_kwargs[i])
            self.batches.append((rows, hidden[0], [kw[0] for kw in cached.layer_kwargs]))
        positions = torch.arange(data.input_ids.shape[1])
        self.valid = positions[None] < data.lengths[:, None]
        # position t predicts token t + 1: continuation tokens are predicted from starts - 1 .. lengths - 2
        self.scored = (positions[None] >= data.starts[:, None] - 1) & (
            positions[None] < data.lengths[:, None] - 1
        )
        offsets = torch.cumsum(data.choices, 0) - data.choices
        self.gold_rows = offsets + data.gold
        gold = torch.zeros(data.input_ids.shape[0], dtype=torch.bool)
        gold[self.gold_rows] = True
        # every next-token prediction of the gold sequences (the items' real text)
        self.text = gold[:, None] & (positions[None] < data.lengths[:, None] - 1)
        self.evaluations = 0

    @torch.no_grad()
    def sequence_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of log-probabilities of each sequence's continuation and (gold sequences only) of its
        whole text, on the model as it is now."""
        layers = self.adapter.decoder_layers(self.model)
        norm, head = self.model.model.norm, self.model.get_output_embeddings()
        device = next(self.model.parameters()).device
        out = torch.zeros(self.data.input_ids.shape[0])
        text_out = torch.zeros(self.data.input_ids.shape[0])
        for rows, states, kwargs in self.batches:
            length = states.shape[1]
            self.working.valid = self.valid[rows, :length].reshape(-1).to(device)
            h = [states]
            for i in range(self.first, len(layers)):
                h = run_layer(layers[i], h, [move_to_device(kwargs[i], device)])
            mask = (self.scored[rows, :length] | self.text[rows, :length]).to(device)
            logp = torch.log_softmax(head(norm(h[0])[mask]).float(), dim=-1)
            targets = self.data.input_ids[rows, :length].to(device)[:, 1:][mask[:, :-1]]
            token_logp = logp.gather(1, targets[:, None]).squeeze(1)
            which = mask.nonzero()[:, 0]
            for part, result in ((self.scored, out), (self.text, text_out)):
                keep = part[rows, :length].to(device)[mask]
                seq = torch.zeros(len(rows), device=device).index_add_(0, which[keep], token_logp[keep])
                result[rows] = seq.cpu()
        self.working.valid = None
        return out, text_out

    def task_text(self, window: int = 64) -> torch.Tensor:
        """The items' real text (context + gold continuation) as ``[n, window]`` token windows."""
        rows = self.gold_rows.tolist()
        stream = torch.cat([self.data.input_ids[r, : self.data.lengths[r]] for r in rows])
        n = max(1, stream.numel() // window)
        return stream[: n * window].view(n, -1) if stream.numel() >= window else stream[None]

    def score(self, logprobs: tuple[torch.Tensor, torch.Tensor]) -> Fitness:
        logprobs, text_logprobs = logprobs
        data = self.data
        offsets = torch.cumsum(data.choices, 0) - data.choices
        correct, gold_logp = 0, 0.0
        for n, (start, count) in enumerate(zip(offsets.tolist(), data.choices.tolist(), strict=True)):
            scores = logprobs[start : start + count]
            gold = int(data.gold[n])
            correct += int(int(scores.argmax()) == gold)
            gold_logp += float(scores[gold])
        gold_rows = offsets + data.gold
        gold_tokens = int((data.lengths - data.starts)[gold_rows].sum())
        accuracy = correct / len(data.gold) if bool((data.choices > 1).any()) else None  # plain text
        nll = -gold_logp / gold_tokens
        # accuracy moves in steps of 1/items; the gold continuations' loss breaks its ties
        text_nll = -float(text_logprobs.sum()) / int(self.text.sum())
        value = {"accuracy": (accuracy or 0.0) - 1e-3 * nll, "loss": -nll, "text": -text_nll}[self.objective]
        return Fitness(value=value, accuracy=accuracy, nll=nll, text_nll=text_nll)

    def evaluate(
        self, merge: dict[int, torch.Tensor], transfer: dict[int, torch.Tensor], top_k: int | dict[int, int]
    ) -> Fitness:
        """Fitness of one candidate (the model is left as it was)."""
        with self.working.applied(merge, transfer, top_k):
            logprobs = self.sequence_logprobs()
        self.evaluations += 1
        return self.score(logprobs)

    def record_logits(
        self, merge: dict[int, torch.Tensor], transfer: dict[int, torch.Tensor], top_k: int | dict[int, int]
    ) -> dict[int, torch.Tensor]:
        """The original router logits [tokens, E] each MoE layer sees under the candidate (real tokens)."""
        self.working.recorded = {i: [] for i in self.working.layers}
        try:
            with self.working.applied(merge, transfer, top_k):
                self.sequence_logprobs()
            return {i: torch.cat(parts) for i, parts in self.working.recorded.items()}
        finally:
            self.working.recorded = {}
