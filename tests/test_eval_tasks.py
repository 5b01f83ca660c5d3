"""Continuation tasks: the packaged files, their build, lm-eval runs on a tiny model, and bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from moeshrink.errors import MoeShrinkError
from moeshrink.evaluate.tasks import (
    build_continuation_tasks,
    known_tasks,
    run_lm_eval,
    task_config,
    validate_task_file,
)
from moeshrink.testbed import paths

DOMAINS = ("wiki", "shakespeare", "pydoc", "bible")


def _items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus_docs() -> dict[str, str]:
    """``<domain>/<doc id>`` -> text of every packaged test document."""
    docs = {}
    for domain in DOMAINS:
        for row in _items(paths.corpus_dir() / domain / "test.jsonl"):
            docs[f"{domain}/{row['id']}"] = row["text"]
    return docs


@pytest.fixture(scope="module")
def tiny_lm():
    """A random tiny Mixtral with the testbed's 8192-token vocabulary and tokenizer (in memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeshrink.testbed.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=8192))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with other work on the machine
    yield model, AutoTokenizer.from_pretrained(str(paths.tokenizer_dir()))
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ packaged task files


def test_packaged_tasks_exist_for_every_domain():
    tasks = known_tasks()
    assert set(tasks) == {f"moeshrink_{d}" for d in DOMAINS}
    assert (paths.tasks_dir() / "README.md").is_file()
    assert sum(p.stat().st_size for p in tasks.values()) < 600_000


@pytest.mark.parametrize("domain", DOMAINS)
def test_packaged_task_items_are_well_formed(domain, corpus_docs):
    path = known_tasks()[f"moeshrink_{domain}"]
    count = validate_task_file(path)
    assert 100 <= count <= 200  # the demo scores the first 100 of each task
    items = _items(path)
    assert len({it["id"] for it in items}) == len(items)
    golds = Counter(it["gold"] for it in items)
    assert set(golds) == {0, 1, 2, 3}
    assert max(golds.values()) - min(golds.values()) <= 1, golds  # balanced
    first = Counter(it["gold"] for it in items[:100])
    assert all(15 <= n <= 35 for n in first.values()), first  # and among the first 100
    for it in items:
        choices, gold = it["choices"], it["gold"]
        assert len(choices) == 4 and 0 <= gold < 4
        # No whitespace artefacts: lm-eval joins them with a single space.
        for text in [it["context"], *choices]:
            assert text == text.strip() and text
        # Same length in words; the true continuation is distinct from every distractor.
        assert len({len(c.split()) for c in choices}) == 1
        assert len({_norm(c) for c in choices}) == 4
        # The gold continues the passage in its document; distractors come from other documents.
        doc = corpus_docs[it["id"].rsplit("@", 1)[0]]
        assert f"{it['context']} {choices[gold]}" in doc
        for k, choice in enumerate(choices):
            if k != gold:
                assert choice not in doc
                # from where a gold may start: at least 40 words into another document
                sources = [t for i, t in corpus_docs.items() if i.startswith(f"{domain}/") and choice in t]
                assert any(len(t[: t.index(choice)].split()) >= 40 for t in sources), choice


def test_build_reproduces_packaged_file_from_test_split_only(tmp_path):
    corpus = tmp_path / "corpus" / "bible"
    corpus.mkdir(parents=True)
    shutil.copy(paths.corpus_dir() / "bible" / "test.jsonl", corpus / "test.jsonl")  # no calib/train
    written = build_continuation_tasks(tmp_path / "corpus", tmp_path / "out")
    assert list(written) == ["moeshrink_bible"]
    assert written["moeshrink_bible"].read_bytes() == known_tasks()["moeshrink_bible"].read_bytes()


def test_build_is_deterministic_and_seeded(tmp_path):
    corpus = tmp_path / "corpus" / "shakespeare"
    corpus.mkdir(parents=True)
    shutil.copy(paths.corpus_dir() / "shakespeare" / "test.jsonl", corpus / "test.jsonl")
    kwargs = dict(items_per_domain=24, context_words=20, continuation_words=8)
    a = build_continuation_tasks(tmp_path / "corpus", tmp_path / "a", **kwargs)["moeshrink_shakespeare"]
    b = build_continuation_tasks(tmp_path / "corpus", tmp_path / "b", **kwargs)["moeshrink_shakespeare"]
    c = build_continuation_tasks(tmp_path / "corpus", tmp_path / "c", seed=1, **kwargs)[
        "moeshrink_shakespeare"
    ]
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    items = _items(a)
    assert len(items) == 24
    assert all(len(it["context"].split()) == 20 for it in items)
    assert all(len(ch.split()) == 8 for it in items for ch in it["choices"])


def test_task_config_is_an_lm_eval_multiple_choice_dict(tmp_path):
    cfg = task_config("t", tmp_path / "t.jsonl")
    assert cfg["task"] == "t" and cfg["output_type"] == "multiple_choice"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "t.jsonl").resolve())
    assert cfg["target_delimiter"] == " "
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm", "acc_mutual_info"}


# --------------------------------------------------------------------------------------- lm-eval


def test_run_lm_eval_on_a_tiny_model(tiny_lm):
    model, tokenizer = tiny_lm
    results = run_lm_eval(model, tokenizer, ["moeshrink_wiki"], limit=4, batch_size=4)
    assert set(results) == {"moeshrink_wiki"}
    row = results["moeshrink_wiki"]
    assert row["samples"] == 4
    for key in ("acc", "acc_norm", "acc_mutual_info"):
        assert 0.0 <= row[key] <= 1.0
        assert row[f"{key}_stderr"] >= 0.0


@torch.no_grad()
def _logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_mutual_information_accuracy_equals_a_hand_computation(tiny_lm):
    """acc_mutual_info picks the choice with the largest log P(choice | passage) - log P(choice) (the
    choice after the prefix token alone); acc the largest log P(choice | passage)."""
    model, tokenizer = tiny_lm
    items = _items(known_tasks()["moeshrink_wiki"])[:8]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    right = {"acc": 0, "acc_mutual_info": 0}
    for it in items:
        context = tokenizer.encode(it["context"])
        conditional, pmi = [], []
        for choice in it["choices"]:
            continuation = tokenizer.encode(f"{it['context']} {choice}")[len(context) :]
            conditional.append(_logprob(model, context, continuation))
            pmi.append(conditional[-1] - _logprob(model, [prefix], tokenizer.encode(f" {choice}")))
        right["acc"] += int(max(range(4), key=conditional.__getitem__) == it["gold"])
        right["acc_mutual_info"] += int(max(range(4), key=pmi.__getitem__) == it["gold"])
    row = run_lm_eval(model, tokenizer, ["moeshrink_wiki"], limit=len(items), batch_size=4)["moeshrink_wiki"]
    assert row["acc"] == right["acc"] / len(items)
    assert row["acc_mutual_info"] == right["acc_mutual_info"] / len(items)


def test_run_lm_eval_with_a_task_file_path(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(it) for it in _items(known_tasks()["moeshrink_bible"])[:3]) + "\n")
    results = run_lm_eval(model, tokenizer, [str(path)], batch_size=4)
    assert results["mine"]["samples"] == 3


# ------------------------------------------------------------------------------------- bad input


def test_missing_task_file_is_a_user_error(tmp_path):
    with pytest.raises(MoeShrinkError, match="not found"):
        run_lm_eval(None, None, [str(tmp_path / "absent.jsonl")])
    with pytest.raises(MoeShrinkError, match="moeshrink_nope.jsonl not found"):
        run_lm_eval(None, None, ["moeshrink_nope"], data_dir=tmp_path)


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"context": "a", "choices": ["b", "c"]}), "missing key"),
        (json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}), "not an index"),
        (json.dumps({"context": "a", "choices": "bc", "gold": 0}), "choices must be"),
        ("", "empty line"),
    ],
)
def test_malformed_task_line_names_file_and_line(tmp_path, bad, problem):
    good = json.dumps({"context": "a b", "choices": ["c", "d", "e", "f"], "gold": 1, "id": "x"})
    path = tmp_path / "moeshrink_bad.jsonl"
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(MoeShrinkError, match=problem) as info:
        run_lm_eval(None, None, ["moeshrink_bad"], data_dir=tmp_path)
    message = str(info.value)
    assert f"{path}:3" in message and "\n" not in message


def test_unknown_task_lists_the_local_tasks():
    with pytest.raises(MoeShrinkError) as info:
        run_lm_eval(None, None, ["moeshrink_wiki", "no_such_task_zz9"])
    message = str(info.value)
    assert "no_such_task_zz9" in message and str(paths.tasks_dir()) in message
    assert all(f"moeshrink_{d}" in message for d in DOMAINS)
    assert "\n" not in message


def test_no_tasks_or_bad_limit_is_a_user_error():
    with pytest.raises(MoeShrinkError):
        run_lm_eval(None, None, [])
    with pytest.raises(MoeShrinkError, match="limit"):
        run_lm_eval(None, None, ["moeshrink_wiki"], limit=0)


def test_name_in_lm_eval_files_but_not_a_task_is_rejected_before_the_model_is_touched():
    # "output_type" occurs in lm-eval's YAML files (so the quick scan passes it) but names no task.
    with pytest.raises(MoeShrinkError, match="unknown task.*output_type"):
        run_lm_eval(None, None, ["output_type"])


def test_shared_prefix_lm_gives_hflms_log_likelihoods(tiny_lm):
    """Each context run once for all its continuations: the log-likelihoods and greedy flags of lm-eval's
    HFLM, for contexts of several lengths, one-token continuations, a context with more continuations
    than one pass holds, and the prefix token alone (mutual information's unconditional requests)."""
    from lm_eval.models.huggingface import HFLM

    from moeshrink.evaluate import shared_prefix
    from moeshrink.evaluate.shared_prefix import SharedPrefixLM

    model, tokenizer = tiny_lm
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 8192, (n,), generator=g).tolist()

    contexts = [ids(n) for n in (3, 17, 9, 1)]
    requests = [(None, ctx, ids(n)) for ctx in contexts[:3] for n in (1, 5, 12)]
    requests += [(None, contexts[3], ids(1 + k % 7)) for k in range(shared_prefix.ROWS_PER_PASS + 5)]
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)._loglikelihood_tokens(requests, True)
    shared = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    assert shared._can_share()
    got = shared._loglikelihood_tokens(requests, True)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)


def test_shared_prefix_lm_leaves_sliding_window_models_to_hflm(tiny_lm):
    from transformers import AutoModelForCausalLM

    from moeshrink.evaluate.shared_prefix import SharedPrefixLM
    from moeshrink.testbed.tiny import tiny_config

    _, tokenizer = tiny_lm
    sliding = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=8192, sliding_window=8))
    lm = SharedPrefixLM(pretrained=sliding, tokenizer=tokenizer, batch_size=4)
    assert not lm._can_share()
    requests = [(None, [5, 6, 7], [8, 9]), (None, [5, 6, 7], [10])]
    assert len(lm._loglikelihood_tokens(requests, True)) == 2
