"""One evaluation of one model: perplexity per domain, multiple-choice tasks, expert usage, speed, memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from moeshrink.arch import get_adapter
from moeshrink.evaluate.perplexity import evaluate_domains, held_out_files
from moeshrink.evaluate.speed import measure_speed, parameter_bytes
from moeshrink.testbed import paths


def evaluate_model(
    model: nn.Module,
    tokenizer,
    *,
    data_dir: Path | None = None,
    domains: Sequence[str] | None = None,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    task_limit: int | None = None,
    max_tokens: int | None = 32768,
    seq_len: int = 256,
    usage: bool = True,
    speed: bool = True,
    device: str = "cpu",
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Everything ``moeshrink eval`` reports about ``model``, as plain JSON-able data.

    Perplexity is measured on ``data_dir/<domain>/<split>.jsonl``: ``test`` for numbers to report,
    ``validation`` for choosing defaults and options (the testbed corpus has both). The model is
    evaluated in its own dtype (see
    :func:`moeshrink.runtime.compute_dtype`). ``progress`` shows a bar over the
    perplexity windows and lm-eval's requests.
    """
    data_dir = data_dir or paths.corpus_dir()
    adapter = get_adapter(model.config) if usage else None
    files = held_out_files(data_dir, domains, split)
    result: dict = {
        "experts_per_layer": [layer.num_experts for layer in get_adapter(model.config).moe_layers(model)],
        "top_k": int(model.config.num_experts_per_tok),
        "parameter_bytes": parameter_bytes(model),
        "domains": evaluate_domains(
            model,
            tokenizer,
            files,
            adapter=adapter,
            seq_len=seq_len,
            max_tokens=max_tokens,
            batch_size=batch_size,
            device=device,
            progress=progress,
        ),
    }
    if tasks:
        from moeshrink.evaluate.tasks import run_lm_eval  # lm-eval is slow to import; only when asked

        result["tasks"] = run_lm_eval(
            model, tokenizer, list(tasks), limit=task_limit, device=device, progress=progress
        )
    if speed:
        result["speed"] = measure_speed(model, device=device)
    return result
