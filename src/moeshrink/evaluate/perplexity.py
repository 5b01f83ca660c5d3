"""Perplexity on held-out text, per domain, and expert usage per layer on the same tokens."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from moeshrink.arch import FamilyAdapter
from moeshrink.engine.data import read_documents, tokenize_documents
from moeshrink.engine.observers import LayerObserver
from moeshrink.errors import MoeShrinkError


def domain_windows(tokenizer, path: Path, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The held-out file as non-overlapping ``[n, seq_len]`` windows, at most ``max_tokens`` tokens."""
    stream = tokenize_documents(tokenizer, read_documents([path]))
    n = stream.numel() // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise MoeShrinkError(
            f"{path}: fewer than {seq_len} tokens of text; give a longer file or lower --seq-len"
        )
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Token-level perplexity: within each window every token after the first is predicted from
    the tokens before it in that window (the first token of a window has no context and is not
    scored). ``progress`` is called with the number of windows done after each batch."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
        if progress is not None:
            progress(ids.shape[0])
    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "nll": total_nll / total_tokens,
        "tokens": total_tokens,
    }


@contextlib.contextmanager
def observing_usage(model: nn.Module, adapter: FamilyAdapter) -> Iterator[list[LayerObserver]]:
    """Count the experts each MoE layer routes to during the forwards run inside the block."""
    observers = [LayerObserver(layer, set()) for layer in adapter.moe_layers(model)]
    for o in observers:
        o.__enter__()
    try:
        yield observers
    finally:
        for o in observers:
            o.__exit__(None, None, None)


def usage_fractions(observers: Sequence[LayerObserver]) -> list[list[float]]:
    """Fraction of tokens routed to each expert, per MoE layer: ``[layer][expert]`` (rows sum to top-k)."""
    return [o.stats.frequency().tolist() for o in observers]


@torch.no_grad()
def expert_usage(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[list[float]]:
    """Fraction of tokens routed to each expert, per MoE layer: ``[layer][expert]`` (rows sum to top-k)."""
    with observing_usage(model, adapter) as observers:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device))
    return usage_fractions(observers)


def evaluate_domains(
    model: nn.Module,
    tokenizer,
    files: Mapping[str, Path],
    *,
    adapter: FamilyAdapter | None = None,
    seq_len: int = 256,
    max_tokens: int | None = 32768,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, dict]:
    """Perplexity (and, with an adapter, expert usage, counted in the same forward passes) for each
    domain's held-out file; ``progress`` shows a bar over all windows."""
    windows = {domain: domain_windows(tokenizer, path, seq_len, max_tokens) for domain, path in files.items()}
    results = {}
    with tqdm(
        total=sum(w.shape[0] for w in windows.values()),
        desc="perplexity",
        unit="window",
        disable=not progress,
        leave=False,
    ) as bar:
        for domain, domain_ids in windows.items():
            with contextlib.ExitStack() as stack:
                observers = stack.enter_context(observing_usage(model, adapter)) if adapter else None
                results[domain] = perplexity(model, domain_ids, batch_size, device, progress=bar.update)
            if observers is not None:
                results[domain]["expert_usage"] = usage_fractions(observers)
    return results


def held_out_files(
    data_dir: Path, domains: Sequence[str] | None = None, split: str = "test"
) -> dict[str, Path]:
    """``{domain: data_dir/domain/split.jsonl}`` for every (or each named) domain directory."""
    if not data_dir.is_dir():
        raise MoeShrinkError(f"evaluation data directory not found: {data_dir}")
    found = {p.parent.name: p for p in sorted(data_dir.glob(f"*/{split}.jsonl"))}
    if not found:
        raise MoeShrinkError(
            f"{data_dir} has no */{split}.jsonl files: lay the data out as DOMAIN/{split}.jsonl"
        )
    if domains:
        missing = [d for d in domains if d not in found]
        if missing:
            raise MoeShrinkError(
                f"no {split} data for {', '.join(missing)} in {data_dir} (has: {', '.join(found)})"
            )
        found = {d: found[d] for d in domains}
    return found
