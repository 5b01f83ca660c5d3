"""moeshrink's vLLM plugin serves per-layer outputs exactly (moeshrink.serving.vllm_plugin).

For every covered family, a global-budget output (different expert counts per layer) and a per-layer
top-k output load in vLLM through the plugin; vLLM's prompt log-probs equal those of moeshrink's own
``load_model`` in transformers within the family's tolerance, and greedy generation runs. The same
outputs with the original architecture name are refused (counts) or, for top-k, visibly a different
model, and with the plugin disabled vLLM refuses them by name. Needs vLLM (skipped without it); run
with ``.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm``.

Tolerances are the largest |Δ log-prob| over the checked tokens (and, in bf16, the mean): float32
serving of the bf16 testbed and of tiny random models matches to ~1e-6. vLLM's own DeepSeek class
differs from transformers by ~0.05 in float32 on the unpruned tiny checkpoint already (its MLA and
grouped routing kernels), so DeepSeek gets 0.15. In bf16 both sides round differently and an
occasional near-tie in routing flips one token's experts: the mean stays ~0.01, the max was 0.06 on
corpus text (0.35 on random token ids), hence 0.5 and a mean of 0.03.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

vllm = pytest.importorskip("vllm")

import moeshrink  # noqa: E402
from moeshrink.io.checkpoint import load_model  # noqa: E402
from moeshrink.io.export import load_plan  # noqa: E402
from moeshrink.serving import base_architecture  # noqa: E402
from moeshrink.serving.vllm_models import built_moe_layers  # noqa: E402
from moeshrink.surgery.apply import PER_LAYER_KEY, TOP_K_PER_LAYER_KEY  # noqa: E402
from moeshrink.testbed.paths import corpus_dir  # noqa: E402
from moeshrink.testbed.tiny import build_tiny_model  # noqa: E402

CALIB = corpus_dir() / "wiki" / "calib.jsonl"
TEXT = corpus_dir() / "wiki" / "test.jsonl"
TESTBED = Path(moeshrink.__file__).parent / "testbed" / "data" / "moeshrink-tiny"
SEQUENCES, LENGTH, GENERATE = 3, 48, 8

# vLLM's CPU attention needs head sizes >= 32 and its CPU MLA a latent of 512 + 64.
HEADS = dict(num_attention_heads=2, num_key_value_heads=2)
MLA = dict(HEADS, kv_lora_rank=512, qk_rope_head_dim=64)


@dataclass(frozen=True)
class Case:
    """One family's source checkpoint, how to make its per-layer outputs, and its tolerances."""

    family: str
    overrides: dict[str, Any] = field(default_factory=dict)
    keep: int = 4
    tolerance: float = 1e-4  # max |Δ log-prob|
    mean_tolerance: float | None = None
    dtype: str = "float32"
    # DeepSeek-V3: favour 4 experts in the last layer (correction bias), so the global budget differs
    skew_bias: bool = False
    # no global-budget split that differs (DeepSeek-V2 has no router bias to skew): drop 2 experts of the last layer
    edit_counts: bool = False


CASES = {
    "mixtral": Case("mixtral", HEADS),
    "qwen2_moe": Case("qwen2_moe", HEADS, keep=3),
    "qwen3_moe": Case("qwen3_moe", dict(head_dim=32)),
    "olmoe": Case("olmoe", HEADS),
    "deepseek_v3": Case(
        "deepseek_v3", dict(MLA, topk_method="noaux_tc"), keep=6, tolerance=0.15, skew_bias=True
    ),
    "deepseek_v2": Case("deepseek_v2", MLA, keep=6, tolerance=0.15, edit_counts=True),
    # the trained testbed (Mixtral, 16 experts, bf16): served in float32 (exact upcast) and in bf16
    "testbed": Case("mixtral", keep=8),
    "testbed-bf16": Case("mixtral", keep=8, tolerance=0.5, mean_tolerance=0.03, dtype="bfloat16"),
}
KINDS = ("counts", "top_k")


@pytest.fixture(scope="module", autouse=True)
def in_process_engine():
    """One process, small KV cache: each engine starts in seconds and the plugin loads in-process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("MOESHRINK_VERIFY", "0")
        yield


def with_architecture(src: Path, dst: Path, architecture: str) -> Path:
    """A copy of ``src`` whose config names ``architecture``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = [architecture]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def source_checkpoint(name: str, case: Case, root: Path) -> Path:
    if name.startswith("testbed"):
        return TESTBED
    src = build_tiny_model(case.family, root / name, seed=1, **case.overrides)
    if case.skew_bias:
        state = load_file(src / "model.safetensors")
        state["model.layers.2.mlp.gate.e_score_correction_bias"][[0, 1, 4, 5]] += 1.0
        save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return src


def make_outputs(name: str, case: Case, root: Path) -> dict[str, Path]:
    """The family's per-layer outputs: ``counts`` (global budget) and ``top_k`` (per-layer top-k:
    the uniform plan with top-1 in every other MoE layer, re-applied through the export)."""
    src = source_checkpoint(name, case, root)
    common = dict(calib=str(CALIB), samples=8, seq_len=64, progress=False)
    uniform = moeshrink.prune(
        str(src), "frequency", keep=case.keep, output=root / f"{name}-uniform", **common
    )
    counts = root / f"{name}-counts"
    if case.edit_counts:
        plan = load_plan(uniform.output / "moeshrink_plan.json")
        plan.layers[-1].experts = plan.layers[-1].experts[: case.keep - 2]
        moeshrink.apply_plan(str(src), plan, counts)
    else:
        moeshrink.prune(str(src), "frequency", keep=case.keep, global_budget=True, output=counts, **common)
    plan = load_plan(uniform.output / "moeshrink_plan.json")
    for i, layer in enumerate(plan.layers):
        layer.top_k = 1 if i % 2 == 0 else 2
    top_k = moeshrink.apply_plan(str(src), plan, root / f"{name}-top_k").output
    return {"counts": counts, "top_k": Path(top_k)}


class Outputs(dict):
    """Each case's outputs, made when a test first asks for them."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> dict[str, Path]:
        self[name] = make_outputs(name, CASES[name], self.root)
        return self[name]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Outputs:
    return Outputs(tmp_path_factory.mktemp("vllm-plugin"))


def prompts(path: Path) -> list[list[int]]:
    """Token ids of a few held-out corpus texts, by the output's own tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [json.loads(line)["text"] for line in TEXT.read_text().splitlines()[:20] if line.strip()]
    ids = [tokenizer(t)["input_ids"][:LENGTH] for t in texts]
    return [i for i in ids if len(i) == LENGTH][:SEQUENCES]


def reference(path: Path, dtype: str, input_ids: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """moeshrink's own model in transformers: log-probs of each next token, and greedy tokens."""
    model = load_model(path, dtype=dtype).model
    with torch.no_grad():
        ids = torch.tensor(input_ids)
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)[:, :-1]
        taken = logprobs.gather(2, ids[:, 1:, None])[..., 0]
        prompt = ids[:1, :GENERATE]
        greedy = model.generate(prompt, max_new_tokens=GENERATE, do_sample=False, min_new_tokens=GENERATE)
    return taken, greedy[0, GENERATE:].tolist()


def serve(
    path: Path, dtype: str, input_ids: list[list[int]]
) -> tuple[torch.Tensor, list[int], dict[int, tuple[int, int]]]:
    """vLLM's prompt log-probs of ``input_ids``, its greedy tokens after the first prompt's start, and
    the fused-MoE layers it built (``{layer: (experts, top-k)}``)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), dtype=dtype, max_model_len=128, enforce_eager=True, seed=0, max_num_seqs=4)
    try:
        scored = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in input_ids],
            vllm.SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0),
            use_tqdm=False,
        )
        logprobs = torch.tensor(
            [
                [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
                for out, ids in zip(scored, input_ids, strict=True)
            ]
        )
        greedy = llm.generate(
            [TokensPrompt(prompt_token_ids=input_ids[0][:GENERATE])],
            SamplingParams(max_tokens=GENERATE, temperature=0.0),
            use_tqdm=False,
        )
        (built,) = llm.apply_model(built_moe_layers)
        return logprobs, list(greedy[0].outputs[0].token_ids), built
    finally:
        del llm
        gc.collect()


def test_entry_point_registers_the_plugin_classes():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    assert "moeshrink" in {ep.name for ep in entry_points(group="vllm.general_plugins")}
    load_general_plugins()
    supported = set(ModelRegistry.get_supported_archs())
    for name in ("Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe", "DeepseekV2", "DeepseekV3"):
        assert f"Moeshrink{name}ForCausalLM" in supported


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_vllm_serves_per_layer_output_exactly(name, kind, outputs):
    case, path = CASES[name], outputs[name][kind]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"][0].startswith("Moeshrink")
    per_layer = config.get(PER_LAYER_KEY) if kind == "counts" else config.get(TOP_K_PER_LAYER_KEY)
    assert len({v for v in per_layer if v is not None}) > 1, per_layer
    input_ids = prompts(path)
    expected, expected_greedy = reference(path, case.dtype, input_ids)
    got, greedy, built = serve(path, case.dtype, input_ids)
    counts, top_k = config.get(PER_LAYER_KEY), config.get(TOP_K_PER_LAYER_KEY)
    for layer, (experts, k) in built.items():  # the layers vLLM built are the per-layer ones
        assert experts == (counts[layer] if counts else config_count(config)), (layer, built)
        assert k == (top_k[layer] if top_k else config["num_experts_per_tok"]), (layer, built)
    assert sorted(built) == [i for i, c in enumerate(counts or top_k) if c is not None]
    diff = (got - expected).abs()
    print(f"{name} {kind} {case.dtype}: max |Δ log-prob| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() <= case.tolerance
    if case.mean_tolerance is not None:
        assert diff.mean() <= case.mean_tolerance
    assert len(greedy) == GENERATE
    if case.tolerance <= 1e-3:  # exact serving: the same greedy continuation
        assert greedy == expected_greedy


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "testbed"])
def test_original_architecture_name_is_not_served_as_the_per_layer_model(name, outputs, tmp_path):
    """What the plugin's name prevents: vLLM's own class refuses fused per-layer counts, and serves a
    per-layer top-k output with the largest top-k everywhere, a different model."""
    case = CASES[name]
    counts = outputs[name]["counts"]
    plain = with_architecture(counts, tmp_path / "counts", base_architecture(_architecture(counts)))
    with pytest.raises(Exception):  # noqa: B017 (vLLM's loaders raise ValueError or KeyError)
        serve(plain, case.dtype, [[1, 2, 3]])
    top_k = outputs[name]["top_k"]
    plain = with_architecture(top_k, tmp_path / "top_k", base_architecture(_architecture(top_k)))
    input_ids = prompts(plain)
    expected, _ = reference(top_k, case.dtype, input_ids)
    got, _, built = serve(plain, case.dtype, input_ids)
    assert {k for _, k in built.values()} == {
        config_count(json.loads((plain / "config.json").read_text()), "num_experts_per_tok")
    }
    print(f"{name} top_k served by vLLM's own class: max |Δ log-prob| {(got - expected).abs().max():.3g}")
    if case.tolerance <= 1e-3:  # DeepSeek: vLLM's own gap to transformers is as large as the difference
        assert (got - expected).abs().max() > 2 * case.tolerance


def config_count(config: dict[str, Any], key: str | None = None) -> int:
    """The config's routed-expert count (or ``key``'s value)."""
    keys = [key] if key else ["num_local_experts", "num_experts", "n_routed_experts"]
    return next(config[k] for k in keys if config.get(k) is not None)


def _architecture(path: Path) -> str:
    return json.loads((path / "config.json").read_text())["architectures"][0]


def test_without_the_plugin_vllm_refuses_per_layer_outputs_by_name(outputs):
    """vLLM with moeshrink's plugin disabled fails at once with "architecture not supported"."""
    code = (
        "import sys\nfrom vllm import LLM\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n        LLM(model=path, max_model_len=64, enforce_eager=True)\n"
        "    except Exception as e:\n        print('REFUSED', str(e).replace(chr(10), ' '))\n"
        "    else:\n        print('SERVED', path)\n"
    )
    paths = [str(outputs["mixtral"]["counts"]), str(outputs["mixtral"]["top_k"])]
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run = subprocess.run(
        [sys.executable, "-c", code, *paths], env=env, capture_output=True, text=True, timeout=600
    )
    refused = [line for line in run.stdout.splitlines() if line.startswith(("REFUSED", "SERVED"))]
    assert len(refused) == 2, run.stdout + run.stderr
    for line in refused:
        assert (
            line.startswith("REFUSED") and "MoeshrinkMixtralForCausalLM" in line and "not supported" in line
        )


def test_unknown_vllm_version_is_named():
    from moeshrink.serving.vllm_models import check_vllm_version

    check_vllm_version(vllm.__version__)  # the installed one is supported
    with pytest.raises(RuntimeError, match=r"vLLM 0\.32\.x .*this is vLLM 0\.40\.1"):
        check_vllm_version("0.40.1")
