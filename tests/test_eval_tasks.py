"""Continuation tasks: the packaged files, their build, lm-eval runs on a tiny model, and bad input."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

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
    assert 100 <= count <= 200  # 200 asked; the halved test split holds fewer passages in some domains
    items = _items(path)
    assert len({it["id"] for it in items}) == len(items)
    golds = Counter(it["gold"] for it in items)
    assert set(golds) == {0, 1, 2, 3}
    assert max(golds.values()) - min(golds.values()) <= 1, golds  # balanced
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
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}


# --------------------------------------------------------------------------------------- lm-eval


def test_run_lm_eval_on_a_tiny_model(tiny_lm):
    model, tokenizer = tiny_lm
    results = run_lm_eval(model, tokenizer, ["moeshrink_wiki"], limit=4, batch_size=4)
    assert set(results) == {"moeshrink_wiki"}
    row = results["moeshrink_wiki"]
    assert row["samples"] == 4
    for key in ("acc", "acc_norm"):
        assert 0.0 <= row[key] <= 1.0
        assert row[f"{key}_stderr"] >= 0.0


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
