"""Speed (prefill and decode tokens/s) and memory (parameter bytes, peak RSS, peak GPU memory)."""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (the high-water mark, not the current use)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_engine(model: nn.Module, device: torch.device) -> str:
    """What measured the speed: transformers' own forward and ``generate`` (not a serving engine), on
    which device, in which dtype, with how many CPU threads."""
    import transformers

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"transformers {transformers.__version__} (PyTorch {torch.__version__}, {where}, {dtype})"


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    *,
    batch_size: int = 4,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Best-of-``repeats`` prefill and greedy-decode throughput on random prompts: the tokens the
    forward pass scored and the tokens ``generate`` added (``prefill_tokens``, ``decode_tokens``, per
    repeat) over the best time; decode time is ``generate``'s minus one prefill."""
    device_t = torch.device(device)
    vocab = vocab_size or model.config.vocab_size
    ids = torch.randint(1, vocab, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)).to(
        device_t
    )
    if device_t.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device_t)
    model(input_ids=ids[:, :8])  # warm-up
    prefill, decode = float("inf"), float("inf")
    prefill_tokens = decode_tokens = 0
    for _ in range(repeats):
        _sync(device_t)
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        _sync(device_t)
        prefill = min(prefill, time.perf_counter() - t)
        prefill_tokens = logits.shape[0] * logits.shape[1]
        t = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        _sync(device_t)
        decode = min(decode, time.perf_counter() - t - prefill)
        decode_tokens = out[:, ids.shape[1] :].numel()  # the tokens generate added
    result = {
        "engine": speed_engine(model, device_t),
        "prefill_tokens_per_s": prefill_tokens / prefill,
        "decode_tokens_per_s": decode_tokens / max(decode, 1e-9),
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "parameter_bytes": parameter_bytes(model),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if device_t.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device_t)
    return result
