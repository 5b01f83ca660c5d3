"""Multiple-choice continuation tasks built from held-out text, evaluated through lm-eval.

Each item shows a passage (``context``) and four candidate continuations of the same number of words:
the true next span and three spans taken from *other* documents of the same domain, so that the task
measures language modelling within the domain rather than domain detection. Chance is 25%.

Construction avoids cues that would identify the true continuation without modelling language:

* the context ends, and every candidate starts, at a word that follows a single space in its source
  (never at a line start), so ``context + " " + choice`` is the original text for the true choice and
  equally natural-looking for the distractors;
* distractors start where a gold may start, at least ``context_words`` words into their document: a
  gold never comes from a document's opening, which in short documents (wiki summaries) is a formulaic
  first sentence; drawn from anywhere, over half the wiki distractors came from there, so position
  told them apart;
* each distractor starts in the same *start class* as the true continuation (whether the previous
  word ends a sentence, whether the first character is upper case), so capitalisation and sentence
  boundaries carry no signal;
* distractors copy about as much of the context as the true continuation does (shared words and
  bigrams, weighted by rarity in the domain), so a model that merely copies context words, e.g. the
  names of a passage, scores near chance;
* candidates keep their source whitespace (line breaks, indentation) and have the same word count;
* gold positions are balanced over the four slots (to within one item).

Scoring: the distractors come from other documents, matched to the gold only as above; for spans
drawn independently of the passage, the posterior that a choice is the true continuation is
proportional to P(choice | passage) / P(choice). The task configs ask
lm-eval for ``acc_mutual_info`` (that rule) beside ``acc`` and ``acc_norm``; reports show it as the
task's accuracy (``report.tables.headline_accuracy``). By plain ``acc``, which favours choices likely
anywhere, the unpruned testbed was below chance on wiki.

Tasks are JSONL files with lines ``{"context": str, "choices": [str, ...], "gold": int, "id": str}``.
The committed corpus's tasks ship in ``moeshrink/testbed/data/tasks``; rebuild them with
``python -m moeshrink.evaluate.tasks``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeshrink.errors import MoeShrinkError
from moeshrink.extras import require_extra
from moeshrink.testbed import paths

TASK_PREFIX = "moeshrink_"
NUM_CHOICES = 4
DEFAULT_ITEMS_PER_DOMAIN = 200
DEFAULT_CONTEXT_WORDS = 40
DEFAULT_CONTINUATION_WORDS = 12
#: Distractors copy as much of the context as the gold, to within this (idf-weighted word count).
COPY_TOLERANCE = 1.0
#: Weight of a copied word on top of its idf, so that copied common words count too.
COMMON_WORD_WEIGHT = 0.5
#: Most weight a copied bigram gets (on top of COMMON_WORD_WEIGHT).
BIGRAM_IDF_CAP = 0.5
#: Seeds handed to lm-eval (python, numpy, torch, few-shot sampler).
DEFAULT_EVAL_SEED = 1234

_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"\w+")
_SENTENCE_END = (".", "!", "?")


# --------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Doc:
    """A document split into words, with the character span of each word."""

    doc_id: str
    text: str
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, doc_id: str, text: str) -> _Doc:
        return cls(doc_id, text, tuple(m.span() for m in _WORD.finditer(text)))

    def __len__(self) -> int:
        return len(self.spans)

    def starts_after_space(self, i: int) -> bool:
        """Whether word ``i`` follows exactly one space (so it is mid-line, not at a line start)."""
        return 0 < i < len(self.spans) and self.text[self.spans[i - 1][1] : self.spans[i][0]] == " "

    def start_class(self, i: int) -> tuple[bool, bool]:
        """(previous word ends a sentence, word ``i`` starts with an upper-case letter)."""
        prev = self.text[self.spans[i - 1][0] : self.spans[i - 1][1]]
        return prev.endswith(_SENTENCE_END), self.text[self.spans[i][0]].isupper()

    def span_text(self, start: int, stop: int) -> str:
        """Words ``start .. stop-1`` with their original inner whitespace."""
        return self.text[self.spans[start][0] : self.spans[stop - 1][1]]


def _read_docs(path: Path) -> list[_Doc]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc = _Doc.parse(str(row["id"]), row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MoeShrinkError(
                    f"{path}:{lineno}: not a corpus line ({exc}); each line must be "
                    '{"id": ..., "text": ...}'
                ) from None
            if len(doc):
                docs.append(doc)
    return docs


def _norm(text: str) -> str:
    return " ".join(text.split())


def _tokens(text: str) -> set[str]:
    """Lower-cased words and word bigrams (bigrams joined by a space) of ``text``."""
    words = [w.lower() for w in _TOKEN.findall(text)]
    return {*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))}


class _CandidatePool:
    """Every possible distractor span of a domain, indexed to match a gold continuation.

    A candidate is a span of ``continuation_words`` words that starts after a single space and at least
    ``context_words`` words into its document, exactly where a gold continuation may start: a document's
    opening words (in wiki, the formulaic "X is a ... in Y" first sentence) are never a gold, so as
    distractors they would be told apart by position alone. Its start class is stored; how much of a
    given context it copies is computed per item from an inverted index of its words and bigrams.
    """

    def __init__(self, docs: Sequence[_Doc], context_words: int, continuation_words: int) -> None:
        self.docs, self.k = docs, continuation_words
        doc_freq: dict[str, int] = {}
        for doc in docs:
            for w in _tokens(doc.text):
                doc_freq[w] = doc_freq.get(w, 0) + 1
        # Rare words and bigrams weigh most: copying a name from the context is a strong cue, "the" is not.
        # Bigrams are capped: weighing rare bigrams fully over-corrects (the gold then copies fewer rare
        # words than the distractors).
        self.idf = {
            w: min(math.log(len(docs) / n), BIGRAM_IDF_CAP) if " " in w else math.log(len(docs) / n)
            for w, n in doc_freq.items()
        }
        rows, postings = [], {}
        for d, doc in enumerate(docs):
            for j in range(context_words, len(doc) - continuation_words + 1):
                if doc.starts_after_space(j):
                    text = doc.span_text(j, j + continuation_words)
                    for w in _tokens(text):
                        postings.setdefault(w, []).append(len(rows))
                    rows.append((d, j, *doc.start_class(j)))
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self.doc, self.start = table[:, 0], table[:, 1]
        self.klass = table[:, 2] * 2 + table[:, 3]
        self.postings = {w: np.array(ix, dtype=np.int64) for w, ix in postings.items()}

    def copied(self, text: str, context: set[str]) -> float:
        """idf-weighted count of the distinct words and bigrams of ``text`` that occur in ``context``."""
        # Sorted: float sums must not depend on set order (string hashing is randomised per process).
        return sum(self.idf.get(w, 0.0) + COMMON_WORD_WEIGHT for w in sorted(_tokens(text) & context))

    def pick(self, d: int, i: int, context: str, true: str, rng: random.Random) -> list[str] | None:
        """Three spans from distinct documents other than ``d`` to set beside the true continuation.

        They share its start class (sentence boundary, capital) and copy about as much of the context
        as it does, so that neither capitalisation nor copying the context finds the gold.
        """
        ctx = _tokens(context)
        copied = np.zeros(len(self.doc))
        for w in sorted(ctx):
            if w in self.postings:
                copied[self.postings[w]] += self.idf[w] + COMMON_WORD_WEIGHT
        # Nearest in copied words, in bands of COPY_TOLERANCE and at random within a band: ranking by
        # exact distance (or by length too) would put the gold in the middle of the choices too often.
        dist = np.floor(np.abs(copied - self.copied(true, ctx)) / COPY_TOLERANCE)
        klass = self.docs[d].start_class(i)
        dist[(self.klass != klass[0] * 2 + klass[1]) | (self.doc == d)] = np.inf
        noise = np.random.default_rng(rng.getrandbits(64)).random(len(dist))  # random within a band
        seen, used, out = {_norm(true)}, {d}, []
        for c in np.argsort(dist + noise, kind="stable"):
            if not np.isfinite(dist[c]):
                break
            o, j = int(self.doc[c]), int(self.start[c])
            text = self.docs[o].span_text(j, j + self.k)
            if o in used or _norm(text) in seen:
                continue
            used.add(o)
            seen.add(_norm(text))
            out.append(text)
            if len(out) == NUM_CHOICES - 1:
                return out
        return None


def _windows(doc: _Doc, context_words: int, continuation_words: int, rng: random.Random) -> list[int]:
    """Non-overlapping split points ``i`` (first continuation word) of ``doc``, in random order."""
    window = context_words + continuation_words
    points = [i for i in range(context_words, len(doc) - continuation_words + 1) if doc.starts_after_space(i)]
    rng.shuffle(points)
    taken: list[int] = []
    for i in points:
        if all(abs(i - j) >= window for j in taken):
            taken.append(i)
    return taken


def _build_domain_items(
    docs: Sequence[_Doc],
    domain: str,
    *,
    items_per_domain: int = DEFAULT_ITEMS_PER_DOMAIN,
    seed: int = 0,
    context_words: int = DEFAULT_CONTEXT_WORDS,
    continuation_words: int = DEFAULT_CONTINUATION_WORDS,
) -> list[dict[str, Any]]:
    """Items for one domain: up to ``items_per_domain``, spread round-robin over the documents."""
    rng = random.Random(f"{seed}:{domain}")
    if len(docs) < NUM_CHOICES:
        raise MoeShrinkError(
            f"domain {domain!r} has {len(docs)} test documents; distractors come from other documents, "
            f"so at least {NUM_CHOICES} are needed"
        )
    pool = _CandidatePool(docs, context_words, continuation_words)
    # Split points, one per document per round, so that long documents do not dominate.
    per_doc = [_windows(doc, context_words, continuation_words, rng) for doc in docs]
    order = list(range(len(docs)))
    rng.shuffle(order)
    picks: list[tuple[int, int]] = []
    while len(picks) < items_per_domain and any(per_doc[d] for d in order):
        for d in order:
            if per_doc[d] and len(picks) < items_per_domain:
                picks.append((d, per_doc[d].pop()))

    golds = [k % NUM_CHOICES for k in range(len(picks))]
    rng.shuffle(golds)
    items = []
    for (d, i), gold in zip(picks, golds, strict=True):
        doc = docs[d]
        context, true = doc.span_text(i - context_words, i), doc.span_text(i, i + continuation_words)
        distractors = pool.pick(d, i, context, true, rng)
        if distractors is None:
            continue  # too few other documents with a matching start; skip this item
        items.append(
            {
                "context": context,
                "choices": distractors[:gold] + [true] + distractors[gold:],
                "gold": gold,
                "id": f"{domain}/{doc.doc_id}@{i}",
            }
        )
    rng.shuffle(items)
    return items


def build_continuation_tasks(
    corpus_dir: Path,
    out_dir: Path,
    *,
    items_per_domain: int = DEFAULT_ITEMS_PER_DOMAIN,
    seed: int = 0,
    context_words: int = DEFAULT_CONTEXT_WORDS,
    continuation_words: int = DEFAULT_CONTINUATION_WORDS,
    split: str = "test",
) -> dict[str, Path]:
    """Write ``out_dir/moeshrink_<domain>.jsonl`` for each ``corpus_dir/<domain>/<split>.jsonl``.

    Only that split is read (``test`` for the shipped tasks; ``validation`` for tasks to choose on).
    Returns task name -> written file. Deterministic given ``seed``.
    """
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    domains = sorted(p.parent.name for p in corpus_dir.glob(f"*/{split}.jsonl"))
    if not domains:
        raise MoeShrinkError(
            f"no <domain>/{split}.jsonl files under {corpus_dir}; point at a corpus directory "
            f"such as {paths.corpus_dir()}"
        )
    if context_words < 1 or continuation_words < 1 or items_per_domain < 1:
        raise MoeShrinkError("context_words, continuation_words and items_per_domain must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for domain in domains:
        items = _build_domain_items(
            _read_docs(corpus_dir / domain / f"{split}.jsonl"),
            domain,
            items_per_domain=items_per_domain,
            seed=seed,
            context_words=context_words,
            continuation_words=continuation_words,
        )
        path = out_dir / f"{TASK_PREFIX}{domain}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        written[path.stem] = path
    return written


# ------------------------------------------------------------------------------- task configs


def task_config(name: str, path: Path) -> dict[str, Any]:
    """An lm-eval task config (as a dict) for a continuation-task JSONL file."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Column names: lm-eval reads doc[column] when the string names a dataset feature.
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        # Choices are stored without a leading space; lm-eval scores ``context + " " + choice``.
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_mutual_info", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def known_tasks(data_dir: Path | None = None) -> dict[str, Path]:
    """Local task name (file stem) -> JSONL path, for every ``*.jsonl`` in ``data_dir``.

    ``data_dir`` defaults to the packaged ``moeshrink/testbed/data/tasks``.
    """
    data_dir = paths.tasks_dir() if data_dir is None else Path(data_dir)
    if not data_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(data_dir.glob("*.jsonl"))}


def validate_task_file(path: Path) -> int:
    """Check every line of a task JSONL; return the number of items.

    Raises :class:`MoeShrinkError` naming ``file:line`` for the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise MoeShrinkError(
            f"task data file {path} not found; build it with `python -m moeshrink.evaluate.tasks --out "
            f"{path.parent}` or pick a task from {paths.tasks_dir()}"
        )
    fix = 'each line must be {"context": str, "choices": [str, ...], "gold": int index into choices}'
    count = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                raise MoeShrinkError(f"{where}: empty line; remove it ({fix})")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoeShrinkError(f"{where}: not valid JSON ({exc.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise MoeShrinkError(f"{where}: not a JSON object; {fix}")
            missing = [k for k in ("context", "choices", "gold") if k not in row]
            if missing:
                raise MoeShrinkError(f"{where}: missing key(s) {', '.join(missing)}; {fix}")
            context, choices, gold = row["context"], row["choices"], row["gold"]
            if not isinstance(context, str) or not context:
                raise MoeShrinkError(f"{where}: context must be a non-empty string; {fix}")
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise MoeShrinkError(
                    f"{where}: choices must be a list of at least 2 non-empty strings; {fix}"
                )
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise MoeShrinkError(
                    f"{where}: gold {gold!r} is not an index into the {len(choices)} choices; {fix}"
                )
            count += 1
    if count == 0:
        raise MoeShrinkError(f"task data file {path} has no items; {fix}")
    return count


# ----------------------------------------------------------------------------------- evaluation


def _set_offline() -> None:
    """lm-eval and datasets must never reach the network: set the offline flags unless already set."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _lm_eval_tasks_root() -> Path:
    import importlib.util

    require_extra("lm_eval", "evaluating lm-eval tasks")
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.origin).parent / "tasks"


def _mentioned_in_lm_eval(names: Sequence[str]) -> set[str]:
    """Names that occur anywhere in lm-eval's task files: a fast filter before its slow task index."""
    remaining, found = set(names), set()
    for dirpath, _dirs, files in os.walk(_lm_eval_tasks_root()):
        for fname in files:
            if fname.endswith((".yaml", ".yml")):
                text = Path(dirpath, fname).read_text(encoding="utf-8", errors="ignore")
                hits = {n for n in remaining if n in text}
                found |= hits
                remaining -= hits
                if not remaining:
                    return found
    return found


def resolve_tasks(tasks: Sequence[str], data_dir: Path | None = None) -> tuple[list[Any], list[str]]:
    """Turn task names into lm-eval specs; return (specs, the names left to lm-eval's own tasks).

    A local name (a ``*.jsonl`` stem in ``data_dir``) or a path to a ``.jsonl`` file becomes a validated
    dict config; an lm-eval YAML path or any other name is passed to lm-eval as-is. A name that no
    lm-eval task file mentions is rejected here, cheaply; see :func:`_lm_eval_task_manager` for the rest.
    """
    if isinstance(tasks, str) or not tasks:
        raise MoeShrinkError("no tasks given; pass a list of task names, e.g. ['moeshrink_wiki']")
    require_extra("lm_eval", "evaluating tasks")  # before any model is loaded
    shown_dir = paths.tasks_dir() if data_dir is None else Path(data_dir)
    local = known_tasks(data_dir)
    specs: list[Any] = []
    external: list[str] = []
    for name in tasks:
        if name in local:
            validate_task_file(local[name])
            specs.append(task_config(name, local[name]))
        elif name.endswith(".jsonl"):
            path = Path(name)
            validate_task_file(path)
            specs.append(task_config(path.stem, path))
        elif name.startswith(TASK_PREFIX):
            validate_task_file(shown_dir / f"{name}.jsonl")  # raises: file missing
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            specs.append(name)
        else:
            specs.append(name)
            external.append(name)
    if external:
        _reject_unknown(sorted(set(external) - _mentioned_in_lm_eval(external)), local, shown_dir)
    return specs, external


def _reject_unknown(unknown: Sequence[str], local: dict[str, Path], shown_dir: Path) -> None:
    if unknown:
        raise MoeShrinkError(
            f"unknown task(s) {', '.join(unknown)}: not a local task in {shown_dir} "
            f"({', '.join(local) or 'none there'}) nor an lm-eval task; use one of those, a task JSONL "
            f"path, or an lm-eval task name"
        )


def _lm_eval_task_manager(external: Sequence[str], data_dir: Path | None) -> Any:
    """A TaskManager: without lm-eval's built-in tasks when all tasks are local (indexing them takes
    seconds), else with them, after checking that they know every ``external`` name."""
    from lm_eval.tasks import TaskManager

    if not external:
        return TaskManager(include_defaults=False)
    manager = TaskManager()
    known = set(manager.all_tasks)
    shown_dir = paths.tasks_dir() if data_dir is None else Path(data_dir)
    _reject_unknown(sorted(n for n in set(external) if n not in known), known_tasks(data_dir), shown_dir)
    return manager


@contextlib.contextmanager
def _lm_eval_session(progress: bool) -> Iterator[None]:
    """Offline, quiet lm-eval: force the Hugging Face offline flags (also where ``datasets`` or
    ``huggingface_hub`` were imported before the environment variables were set), lower lm-eval's and
    datasets' logging, hide datasets' progress bars and, unless ``progress``, lm-eval's (one bar per
    run, over its requests). Everything is restored after.
    """
    import datasets
    import huggingface_hub.constants
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface
    from tqdm import tqdm

    flags = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved_flags = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "fsspec", "filelock")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # lm-eval records the git hash of the working directory by running git, which prints
    # "fatal: not a git repository" outside a checkout; that hash says nothing about these results.
    saved_git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    modules = (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)
    saved_tqdm = [m.tqdm for m in modules]
    datasets.utils.logging.disable_progress_bar()

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    def request_bar(*args: Any, **kwargs: Any) -> Any:
        kwargs["leave"] = False
        return tqdm(*args, **kwargs)

    # lm-eval's bars over building and tokenising requests take a moment; the one over the model's
    # requests (in the huggingface module) is the one worth showing.
    for m in modules:
        m.tqdm = request_bar if progress and m is lm_eval.models.huggingface else silent_tqdm
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags, strict=True):
            setattr(module, name, value)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for m, saved in zip(modules, saved_tqdm, strict=True):
            m.tqdm = saved
        lm_eval.evaluator.get_git_commit_hash = saved_git_hash
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = "cpu",
    seed: int = DEFAULT_EVAL_SEED,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate a loaded transformers causal LM on ``tasks`` with lm-eval, fully offline.

    Local task names (see :func:`known_tasks`) and ``.jsonl`` paths run from their files; other names
    go to lm-eval as-is (their data must already be in the Hugging Face cache). ``limit`` caps the items
    per task (the first ones). The model is moved to ``device`` unless it is ``None``. lm-eval's
    Hugging Face model runs it with each context computed once for all its choices
    (:class:`~moeshrink.evaluate.shared_prefix.SharedPrefixLM`). Returns ``{task: {"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "samples"}}``, with ``acc_mutual_info`` (and its stderr) for tasks
    that report it, as the local ones do.
    """
    _set_offline()
    if limit is not None and limit < 1:
        raise MoeShrinkError(f"limit must be a positive number of items, got {limit}")
    specs, external = resolve_tasks(tasks, data_dir)

    import lm_eval
    import torch

    from moeshrink.evaluate.shared_prefix import SharedPrefixLM

    with _lm_eval_session(progress):
        manager = _lm_eval_task_manager(external, data_dir)
        if device is not None:
            model.to(device)
        model.eval()
        # log-probabilities and their sums in float32 (lm-eval keeps the model's dtype: bfloat16 sums
        # round to a quarter nat and flip near-ties)
        hflm = SharedPrefixLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32
        )
        try:
            out = lm_eval.simple_evaluate(
                model=hflm,
                tasks=specs,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,  # acc / acc_norm are means: their stderr is closed-form anyway
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except ConnectionError as exc:  # an lm-eval task whose dataset is not in the local cache
            if not external:
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MoeShrinkError(
                f"lm-eval task data for {', '.join(external)} is not available offline ({reason}); "
                "cache its dataset once with network access, or use a local task"
            ) from None
    if out is None:  # non-zero rank in a distributed run
        return {}
    results: dict[str, dict[str, float]] = {}
    for name, metrics in out["results"].items():
        row: dict[str, float] = {}
        for key in (
            "acc",
            "acc_stderr",
            "acc_norm",
            "acc_norm_stderr",
            "acc_mutual_info",
            "acc_mutual_info_stderr",
        ):
            value = metrics.get(f"{key},none")
            if isinstance(value, (int, float)):
                row[key] = float(value)
        if not row:
            continue  # a group's aggregate row without acc, or a task with other metrics
        samples = out.get("n-samples", {}).get(name, {})
        row["samples"] = int(samples.get("effective", samples.get("original", 0)))
        results[name] = row
    return results


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the continuation tasks from a corpus's test (or validation) splits."""
    parser = argparse.ArgumentParser(
        prog="python -m moeshrink.evaluate.tasks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--corpus", type=Path, default=paths.corpus_dir(), help="corpus dir (default: packaged)"
    )
    parser.add_argument("--out", type=Path, help="output dir (default: the packaged tasks, for --split test)")
    parser.add_argument("--split", default="test", help="corpus split to build from (default test)")
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS_PER_DOMAIN, help="items per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-words", type=int, default=DEFAULT_CONTEXT_WORDS)
    parser.add_argument("--continuation-words", type=int, default=DEFAULT_CONTINUATION_WORDS)
    args = parser.parse_args(argv)
    if args.out is None and args.split != "test":
        parser.error("--split other than test needs --out (the packaged tasks are built from test)")
    try:
        written = build_continuation_tasks(
            args.corpus,
            args.out or paths.tasks_dir(),
            items_per_domain=args.items,
            seed=args.seed,
            context_words=args.context_words,
            continuation_words=args.continuation_words,
            split=args.split,
        )
    except MoeShrinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name}: {validate_task_file(path)} items, {path.stat().st_size} bytes -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
