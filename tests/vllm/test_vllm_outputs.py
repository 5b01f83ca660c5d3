"""Every kind of output moeshrink writes loads in vLLM and matches transformers (uniform outputs) or
moeshrink's own loader (per-layer outputs): every pruning and merging method with its defaults, STUN
with a total sparsity, NAEE, sparsity, a top-k change, a global budget, per-layer top-k, an EEP search
with and without its exact router, on the trained testbed; a prune and a merge for every family vLLM
has. Each output is checked as a job's verification checks it (``moeshrink.verify.worker``, float32),
in this process to spare an engine process per output. Needs vLLM (skipped without it)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from transformers import AutoConfig

pytest.importorskip("vllm")

import moeshrink  # noqa: E402
from moeshrink.io.export import load_plan  # noqa: E402
from moeshrink.search import search  # noqa: E402
from moeshrink.testbed.paths import corpus_dir  # noqa: E402
from moeshrink.testbed.paths import testbed_model_dir as testbed_dir  # noqa: E402
from moeshrink.testbed.tiny import build_tiny_model  # noqa: E402
from moeshrink.verify import TOLERANCE, max_abs_diff, sample_input_ids, stray_tensor_files  # noqa: E402
from moeshrink.verify.worker import run_transformers, run_vllm  # noqa: E402

CALIB = dict(calib=str(corpus_dir() / "wiki" / "calib.jsonl"), samples=8, seq_len=64, progress=False)
# vLLM's CPU attention needs head sizes >= 32, its CPU MLA a latent of 512 + 64.
HEADS = dict(num_attention_heads=2, num_key_value_heads=2)
FAMILIES = {
    "mixtral": (HEADS, 4),
    "qwen2_moe": (HEADS, 4),
    "qwen3_moe": (dict(head_dim=32), 4),
    "olmoe": (HEADS, 4),
    "deepseek_v3": (dict(HEADS, kv_lora_rank=512, qk_rope_head_dim=64, topk_method="noaux_tc"), 6),
    "deepseek_v2": (dict(HEADS, kv_lora_rank=512, qk_rope_head_dim=64), 4),
    "phimoe": (HEADS, 4),
    "granitemoe": (HEADS, 4),
    "gpt_oss": (dict(HEADS, head_dim=32), 4),
}
# vLLM's own DeepSeek classes differ from transformers on unpruned tiny models in float32: V3 by
# ~0.05, V2 by ~3e-3.
FAMILY_TOLERANCE = {"deepseek_v3": 0.15, "deepseek_v2": 0.01}

TESTBED_PRUNES = {
    "random": {},
    "frequency": {},
    "soft_activation": {},
    "ean": {},
    "reap": {},
    "naee": {"method_options": {"max_subsets": 200}},
    "msmoe": {},
    "hcsmoe": {},
    "uncurl": {},
    "stun": {},
    "stun+total-sparsity": {"method": "stun", "keep": None, "ratio": 0.25, "total_sparsity": 0.55},
    "stun+selective+global": {"method": "stun", "global_budget": True, "method_options": {"selective": True}},
    "reap+wanda50": {"method": "reap", "sparsity": 0.5},
    "none+2:4": {"method": "none", "keep": None, "nm": "2:4"},
    "none+top1": {"method": "none", "keep": None, "top_k": 1},
    "frequency+global": {"method": "frequency", "global_budget": True},
}


def make_testbed_outputs(root: Path) -> dict[str, tuple[Path, float]]:
    outputs = {}
    for name, change in TESTBED_PRUNES.items():
        kwargs = {"method": name, "keep": 8, **CALIB, **change}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        moeshrink.prune(testbed_dir(), output=root / name, **kwargs)
        outputs[name] = (root / name, TOLERANCE["vllm"])
    plan = load_plan(root / "reap" / "moeshrink_plan.json")
    for i, layer in enumerate(plan.layers):
        layer.top_k = 1 if i % 2 == 0 else 2
    moeshrink.apply_plan(testbed_dir(), plan, root / "reap+per-layer-top-k")
    outputs["reap+per-layer-top-k"] = (root / "reap+per-layer-top-k", TOLERANCE["vllm"])
    task = corpus_dir().parent / "tasks" / "moeshrink_bible.jsonl"
    for exact in (False, True):
        name = f"eep{'+exact-router' if exact else ''}"
        settings = dict(items=16, population=4, prune_iterations=1, merge_iterations=1, progress=False)
        search(testbed_dir(), task, keep=8, output=root / name, exact_router=exact, **settings)
        outputs[name] = (root / name, TOLERANCE["vllm"])
    return outputs


def make_family_outputs(root: Path) -> dict[str, tuple[Path, float]]:
    outputs = {}
    for family, (overrides, keep) in FAMILIES.items():
        source = build_tiny_model(family, root / family, seed=1, **overrides)
        for method in ("reap", "msmoe"):
            out = root / f"{family}-{method}"
            moeshrink.prune(source, method, keep=keep, output=out, **CALIB)
            outputs[f"{family}/{method}"] = (out, FAMILY_TOLERANCE.get(family, TOLERANCE["vllm"]))
    return outputs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[Path, float]]:
    root = tmp_path_factory.mktemp("vllm-outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESHRINK_VERIFY", "0")
        return make_testbed_outputs(root) | make_family_outputs(root)


CASES = [*TESTBED_PRUNES, "reap+per-layer-top-k", "eep", "eep+exact-router"] + [
    f"{family}/{method}" for family in FAMILIES for method in ("reap", "msmoe")
]


@pytest.mark.parametrize("name", CASES)
def test_output_serves_in_vllm(name, outputs):
    path, tolerance = outputs[name]
    input_ids = sample_input_ids(int(AutoConfig.from_pretrained(path).vocab_size))
    expected = run_transformers(path, input_ids)
    served = run_vllm(path, input_ids)
    gc.collect()
    diff = max_abs_diff(served["logprobs"], expected["logprobs"])
    print(f"{name}: max |Δ log-prob| {diff:.2e}")
    assert diff <= tolerance, f"{name}: vLLM differs from transformers by {diff:.3g} (tolerance {tolerance})"
    assert len(served["generated_tokens"]) > 0
    assert stray_tensor_files(path) == []  # nothing but weights beside the weights
