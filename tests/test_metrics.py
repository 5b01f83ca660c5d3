"""The metrics behind every published number: perplexity against a hand computation, expert usage
counted in the same forward passes, and speed's token counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moeshrink.arch import get_adapter
from moeshrink.engine.data import tokenize_documents
from moeshrink.evaluate.perplexity import domain_windows, evaluate_domains, expert_usage, perplexity
from moeshrink.evaluate.speed import measure_speed, parameter_bytes
from moeshrink.testbed import paths

SEQ_LEN = 16


@pytest.fixture(scope="module")
def tiny_lm():
    """A random tiny Mixtral (float32) with the testbed's 8192-token vocabulary and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeshrink.testbed.tiny import randomize_routers, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=8192)).eval()
    randomize_routers(model, "mixtral", seed=0)  # routers that pick different experts for different tokens
    return model, AutoTokenizer.from_pretrained(str(paths.tokenizer_dir()))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Two real documents of the testbed's test split, as a held-out JSONL file."""
    rows = [
        json.loads(line) for line in (paths.corpus_dir() / "wiki" / "test.jsonl").read_text().splitlines()
    ]
    path = tmp_path_factory.mktemp("held_out") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return path


@torch.no_grad()
def _hand_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token t | tokens 0..t-1 of its own window) over t >= 1, one prefix at a time."""
    total, count = 0.0, 0
    for window in windows:
        for t in range(1, window.numel()):
            logits = model(input_ids=window[None, :t]).logits[0, -1].double()
            total -= float(torch.log_softmax(logits, -1)[window[t]])
            count += 1
    return total, count


def test_windows_are_consecutive_non_overlapping_cuts_of_the_token_stream(tiny_lm, text_file):
    _, tokenizer = tiny_lm
    stream = tokenize_documents(
        tokenizer, [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    )
    assert stream.numel() > 6 * SEQ_LEN
    windows = domain_windows(tokenizer, text_file, SEQ_LEN, max_tokens=5 * SEQ_LEN + 3)
    assert windows.shape == (5, SEQ_LEN)  # at most max_tokens tokens, whole windows only
    assert torch.equal(windows.flatten(), stream[: 5 * SEQ_LEN])
    every = domain_windows(tokenizer, text_file, SEQ_LEN, max_tokens=None)
    assert every.shape == (stream.numel() // SEQ_LEN, SEQ_LEN)


def test_perplexity_equals_a_hand_computation(tiny_lm, text_file):
    """Each window is scored on its own: its first token is not predicted (no context), every other
    token from the tokens before it in the same window, never from the previous window."""
    model, tokenizer = tiny_lm
    windows = domain_windows(tokenizer, text_file, SEQ_LEN, max_tokens=5 * SEQ_LEN)
    nll, count = _hand_nll(model, windows)
    result = perplexity(model, windows, batch_size=2)  # batches of 2, 2 and 1 window
    assert result["tokens"] == count == 5 * (SEQ_LEN - 1)
    assert result["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the same tokens as one long window: the first token of windows 2..5 is now scored, with context
    joined = perplexity(model, windows.reshape(1, -1))
    joined_nll, joined_count = _hand_nll(model, windows.reshape(1, -1))
    assert joined["tokens"] == joined_count == 5 * SEQ_LEN - 1
    assert joined["nll"] == pytest.approx(joined_nll / joined_count, rel=1e-5)
    assert joined["nll"] != pytest.approx(result["nll"], rel=1e-5)


def test_expert_usage_is_counted_in_the_perplexity_passes(tiny_lm, text_file):
    """evaluate_domains counts usage during the perplexity forwards: same perplexity as without it,
    same usage as a separate pass, rows summing to top-k."""
    model, tokenizer = tiny_lm
    adapter = get_adapter(model.config)
    files = {"wiki": text_file}
    with_usage = evaluate_domains(model, tokenizer, files, adapter=adapter, seq_len=SEQ_LEN, max_tokens=64)
    without = evaluate_domains(model, tokenizer, files, seq_len=SEQ_LEN, max_tokens=64)
    assert with_usage["wiki"]["perplexity"] == without["wiki"]["perplexity"]
    assert "expert_usage" not in without["wiki"]
    usage = with_usage["wiki"]["expert_usage"]
    separate = expert_usage(model, adapter, domain_windows(tokenizer, text_file, SEQ_LEN, 64))
    assert usage == separate
    assert len(usage) == len(adapter.moe_layers(model))
    for row in usage:
        assert len(row) == model.config.num_local_experts
        assert sum(row) == pytest.approx(model.config.num_experts_per_tok)
        assert sum(x > 0 for x in row) > 1


def test_speed_counts_the_tokens_it_times(tiny_lm):
    model, _ = tiny_lm
    speed = measure_speed(model, batch_size=2, prompt_len=16, new_tokens=4, repeats=1)
    assert speed["prefill_tokens"] == 2 * 16 and speed["decode_tokens"] == 2 * 4
    assert (speed["batch_size"], speed["prompt_len"], speed["new_tokens"]) == (2, 16, 4)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(speed[key]) and speed[key] > 0, (key, speed[key])
    assert speed["parameter_bytes"] == parameter_bytes(model) == 4 * model.num_parameters()
    assert speed["peak_rss_bytes"] > speed["parameter_bytes"]


def test_tables_show_mutual_information_accuracy_where_a_task_reports_it():
    from moeshrink.report.tables import comparison_rows

    local = {"acc": 0.2, "acc_stderr": 0.04, "acc_mutual_info": 0.5, "acc_mutual_info_stderr": 0.05}
    result = {
        "experts_per_layer": [8],
        "top_k": 2,
        "parameter_bytes": 2**20,
        "domains": {"wiki": {"perplexity": 10.0}},
        "tasks": {"moeshrink_wiki": local, "hellaswag": {"acc": 0.3, "acc_stderr": 0.01}},
    }
    header, rows = comparison_rows({"m": result})
    assert header[5:7] == ["acc_mi moeshrink_wiki", "acc hellaswag"]
    assert rows[0][5:7] == ["0.500", "0.300"]
