"""Run one verification check in a fresh process: ``python -m moeshrink.verify.worker KIND DIR IN OUT``.

KIND ``transformers`` loads DIR with plain ``AutoModelForCausalLM.from_pretrained`` (moeshrink's own
loader for its per-layer formats, which plain transformers cannot build) and records the loading
report and the log-probabilities of the input tokens; KIND ``vllm`` loads DIR with ``vllm.LLM`` and
records vLLM's prompt log-probabilities of the same tokens and a short greedy generation; KIND
``vllm-speed`` measures vLLM's throughput on DIR (:mod:`moeshrink.verify.serving`). The checks run
in float32 (the weights upcast exactly), so a difference is the export's or the kernels', not
rounding in half precision. IN holds
``{"input_ids": [[...], ...]}`` (and the speed settings); OUT receives the result as JSON. A fresh process is what a user
gets: nothing of the process that wrote the checkpoint (patched modules, cached state) leaks in.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

GENERATE_TOKENS = 8


def token_logprobs(logits, input_ids) -> list[list[float]]:
    """log p(token t+1 | tokens <= t) for every position but the last, per sequence, in float64."""
    import torch

    logprobs = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1).tolist()


def run_transformers(directory: Path, input_ids: list[list[int]]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY

    config = AutoConfig.from_pretrained(directory)
    per_layer = bool(getattr(config, PER_LAYER_KEY, None) or getattr(config, TOP_K_PER_LAYER_KEY, None))
    # transformers dequantizes block-FP8 on a CPU by the scale grid's shape, wrong for partial tiles
    # (DeepSeek-V3's 576-row kv_a_proj_with_mqa): moeshrink's loader dequantizes by weight_block_size;
    # compressed-tensors needs the compressed-tensors package in transformers: moeshrink's loader does not
    quantized = getattr(config, "quantization_config", None) is not None
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    if per_layer or quantized:
        from moeshrink.io.checkpoint import load_model

        model = load_model(directory, "float32").model
        scheme = (config.quantization_config or {}).get("quant_method") if quantized else None
        kind = {"fp8": "block-FP8, dequantized", None: "per-layer format"}.get(
            scheme, f"{scheme}, dequantized"
        )
        report |= {"loader": f"moeshrink.io.checkpoint.load_model ({kind})"}
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True
        )
        report |= {
            "loader": "transformers.AutoModelForCausalLM.from_pretrained",
            "missing_keys": sorted(info.get("missing_keys", [])),
            "unexpected_keys": sorted(info.get("unexpected_keys", [])),
            "mismatched_keys": sorted(str(k[0]) for k in info.get("mismatched_keys", [])),
        }
    model.eval()
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    report["logprobs"] = token_logprobs(logits, ids)
    return report


def run_vllm(directory: Path, input_ids: list[list[int]]) -> dict[str, Any]:
    # A check needs a small KV cache (vLLM's CPU backend otherwise reserves most of the RAM and
    # refuses to start beside other processes) and no engine subprocess (this one is fresh already).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(ids) for ids in input_ids)
    llm = LLM(
        model=str(directory),
        max_model_len=longest + GENERATE_TOKENS + 8,
        enforce_eager=True,
        dtype="float32",
        seed=0,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in input_ids]
    scored = llm.generate(
        prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False
    )
    logprobs = []
    for ids, out in zip(input_ids, scored, strict=True):
        row = out.prompt_logprobs[1:]  # the first token has none
        logprobs.append([float(entry[token].logprob) for entry, token in zip(row, ids[1:], strict=True)])
    greedy = llm.generate(
        prompts[:1], SamplingParams(max_tokens=GENERATE_TOKENS, temperature=0.0), use_tqdm=False
    )
    return {
        "vllm": vllm.__version__,
        "logprobs": logprobs,
        "generated_tokens": list(greedy[0].outputs[0].token_ids),
    }


def device_name() -> str:
    """The device an engine in this process runs on: the GPU's name, else the CPU's model."""
    import torch

    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.is_file()
        else []
    )
    return f"CPU ({names[0] if names else platform.processor() or platform.machine()})"


def run_vllm_speed(
    directory: Path, input_ids: list[list[int]], new_tokens: int, repeat: int
) -> dict[str, Any]:
    """vLLM's offline throughput on DIR in its checkpoint dtype: prefill tokens/s (one new token) and
    generation tokens/s (``new_tokens`` greedy tokens per prompt, end-of-text ignored), best of
    ``repeat`` after a warm-up."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(ids) for ids in input_ids) + new_tokens + 8
    llm = LLM(
        model=str(directory), max_model_len=longest, enforce_eager=True, seed=0, max_num_seqs=len(input_ids)
    )
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in input_ids]
    prompt_tokens = sum(len(ids) for ids in input_ids)
    llm.generate(batch[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    prefill, generation = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        llm.generate(batch, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        prefill.append(prompt_tokens / (time.perf_counter() - start))
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generation.append(sum(len(o.outputs[0].token_ids) for o in out) / seconds)
    return {
        "engine": {"name": "vLLM", "version": vllm.__version__, "device": device_name()},
        "prefill_tokens_per_s": max(prefill),
        "generation_tokens_per_s": max(generation),
    }


def main(argv: list[str]) -> int:
    kind, directory, inputs, output = argv
    payload = json.loads(Path(inputs).read_text())
    if kind == "vllm-speed":
        result = run_vllm_speed(
            Path(directory), payload["input_ids"], payload["new_tokens"], payload["repeat"]
        )
    else:
        result = {"transformers": run_transformers, "vllm": run_vllm}[kind](
            Path(directory), payload["input_ids"]
        )
    Path(output).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
