"""The committed testbed corpus (calib/validation/test splits), its split function, and the testbed tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeshrink.testbed import paths
from moeshrink.testbed.corpus import (
    DOMAINS,
    EVAL_SPLITS,
    Document,
    carve_validation,
    chunk_paragraphs,
    normalize_text,
    resplit_held_out,
    sha256_file,
    split_documents,
    split_position,
    validation_bound,
)
from moeshrink.testbed.tokenizer import EOS_TOKEN

CORPUS = paths.corpus_dir()
TOKENIZER = paths.tokenizer_dir()


def _load(domain: str, split: str) -> list[dict]:
    with (CORPUS / domain / f"{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_committed_split_parses(domain: str, split: str) -> None:
    path = CORPUS / domain / f"{split}.jsonl"
    assert path.is_file(), f"missing {path}"
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "file must end with a newline"
    docs = [json.loads(line) for line in lines[:-1]]
    assert len(docs) >= 10
    for doc in docs:
        assert set(doc) == {"id", "text"}
        assert isinstance(doc["id"], str) and doc["id"]
        assert isinstance(doc["text"], str) and doc["text"].strip()
        assert doc["text"] == doc["text"].strip("\n")
    assert len({d["id"] for d in docs}) == len(docs)
    chars = sum(len(d["text"]) for d in docs)
    assert 20_000 < chars <= 250_000


@pytest.mark.parametrize("domain", DOMAINS)
def test_manifest_matches_files(manifest: dict, domain: str) -> None:
    entry = manifest["domains"][domain]
    assert entry["source"]["package"] and entry["source"]["version"] and entry["source"]["license"]
    for split in EVAL_SPLITS:
        info = entry["splits"][split]
        path = CORPUS / info["file"]
        assert sha256_file(path) == info["sha256"]
        docs = _load(domain, split)
        assert info["documents"] == len(docs)
        assert info["characters"] == sum(len(d["text"]) for d in docs)
    # The (uncommitted) train split is much larger than the eval splits.
    assert entry["splits"]["train"]["characters"] > 10 * entry["splits"]["test"]["characters"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_calib_validation_and_test_are_disjoint(domain: str) -> None:
    splits = [_load(domain, s) for s in EVAL_SPLITS]
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not {d["id"] for d in a} & {d["id"] for d in b}
            assert not {d["text"] for d in a} & {d["text"] for d in b}


@pytest.mark.parametrize("domain", DOMAINS)
def test_validation_is_the_lower_half_of_the_held_out_interval(manifest: dict, domain: str) -> None:
    bound = validation_bound()
    assert manifest["split"]["validation_share"] == 0.5
    validation, test = _load(domain, "validation"), _load(domain, "test")
    assert all(split_position(d["id"], manifest["seed"]) < bound for d in validation)
    assert all(split_position(d["id"], manifest["seed"]) >= bound for d in test)
    # Neither half is starved: each holds at least a third of the held-out text.
    chars = [sum(len(d["text"]) for d in docs) for docs in (validation, test)]
    assert min(chars) > sum(chars) / 3


def test_resplitting_the_shipped_files_reproduces_them(tmp_path: Path) -> None:
    # From the shipped files alone (no train text): the held-out text re-split with the manifest's
    # seed gives byte-identical validation/test files and manifest; so does the old layout, where
    # all of it was test.jsonl.
    for layout in ("current", "test only"):
        copy = tmp_path / layout
        shutil.copytree(CORPUS, copy)
        if layout == "test only":
            for domain in DOMAINS:
                merged = (copy / domain / "validation.jsonl").read_text(encoding="utf-8")
                merged += (copy / domain / "test.jsonl").read_text(encoding="utf-8")
                (copy / domain / "test.jsonl").write_text(merged, encoding="utf-8")
                (copy / domain / "validation.jsonl").unlink()
        resplit_held_out(copy)
        for path in sorted(CORPUS.rglob("*")):
            if path.is_file():
                assert (copy / path.relative_to(CORPUS)).read_bytes() == path.read_bytes(), path


def test_committed_splits_follow_the_split_function(manifest: dict) -> None:
    # Re-splitting the committed calib + validation + test documents with the manifest's seed sends
    # none to another eval split (the cap may only move documents to train).
    for domain in DOMAINS:
        docs = [Document(d["id"], d["text"]) for s in EVAL_SPLITS for d in _load(domain, s)]
        again = split_documents(docs, seed=manifest["seed"], max_eval_chars=None)
        for split in EVAL_SPLITS:
            assert {d.id for d in again[split]} == {d["id"] for d in _load(domain, split)}


def test_license_note_names_every_source(manifest: dict) -> None:
    note = (CORPUS / "LICENSE.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in note and "Wikipedia contributors" in note
    assert "PSF License" in note and note.count("public domain") >= 2
    for entry in manifest["domains"].values():
        for package in entry["source"]["package"].split(" + "):
            assert package in note


def _synthetic(n: int, size: int = 100) -> list[Document]:
    return [Document(f"doc-{i}", f"text {i} " + "x" * size) for i in range(n)]


def test_split_is_deterministic_and_disjoint() -> None:
    docs = _synthetic(4000)
    a = split_documents(docs, seed=3, max_eval_chars=None)
    b = split_documents(list(reversed(docs)), seed=3, max_eval_chars=None)
    splits = ("train", "calib", "validation", "test")
    for split in splits:
        assert {d.id for d in a[split]} == {d.id for d in b[split]}
    ids = [{d.id for d in a[s]} for s in splits]
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    assert set().union(*ids) == {d.id for d in docs}
    # About 2.5% calib and 1.25% each of validation and test.
    assert 50 < len(a["calib"]) < 160 and 20 < len(a["validation"]) < 90 and 20 < len(a["test"]) < 90
    # Validation is carved out of the held-out documents alone.
    assert carve_validation(a["validation"] + a["test"], seed=3) == {
        "validation": a["validation"],
        "test": a["test"],
    }
    # Input order is kept within each split.
    order = {d.id: i for i, d in enumerate(docs)}
    assert [order[d.id] for d in a["train"]] == sorted(order[d.id] for d in a["train"])
    # Another seed gives another split.
    c = split_documents(docs, seed=4, max_eval_chars=None)
    assert {d.id for d in c["test"]} != ids[2]


def test_split_caps_eval_size() -> None:
    docs = _synthetic(4000, size=1000)
    out = split_documents(docs, seed=0, max_eval_chars=20_000)
    assert 0 < sum(len(d.text) for d in out["calib"]) <= 20_000
    assert 0 < sum(len(d.text) for s in ("validation", "test") for d in out[s]) <= 20_000
    # The cap keeps the held-out documents lowest in hash order, so when it bites, test (the upper
    # part of the interval) shrinks first; the shipped corpus is checked for balance above.
    assert out["validation"]
    assert sum(len(v) for v in out.values()) == len(docs)
    uncapped = split_documents(docs, seed=0, max_eval_chars=None)
    for split in ("validation", "test"):
        assert {d.id for d in out[split]} <= {d.id for d in uncapped[split]}


def test_split_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError):
        split_documents([Document("a", "x"), Document("a", "y")])


def test_normalize_and_chunk() -> None:
    assert normalize_text("\r\n a  b \t\r\n\n\n\n  c\x00\n\n") == " a  b\n\n  c"
    assert normalize_text(" a  b \t c ", collapse_spaces=True) == "a b c"
    text = "\n\n".join(["Heading\n=======", "p" * 50, "q" * 50, "Next\n----", "r" * 50])
    chunks = chunk_paragraphs(text, max_chars=1000, min_chars=40, is_heading=lambda p: "\n" in p)
    assert chunks == ["\n\n".join(["Heading\n=======", "p" * 50, "q" * 50]), "Next\n----\n\n" + "r" * 50]
    assert "\n\n".join(chunks) == text


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))


def test_tokenizer_is_small() -> None:
    total = sum(p.stat().st_size for p in TOKENIZER.iterdir() if p.is_file())
    assert total < 2_000_000


def test_tokenizer_vocab_and_special_tokens(tokenizer) -> None:
    assert 8000 <= len(tokenizer) <= 8300
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.eos_token_id is not None
    # encode adds no special tokens: documents are joined with EOS by the caller.
    assert tokenizer.eos_token_id not in tokenizer.encode("Hello world")


@pytest.mark.parametrize("domain", DOMAINS)
def test_tokenizer_round_trips_each_domain(tokenizer, domain: str) -> None:
    docs = _load(domain, "test")[:25]
    for doc in docs:
        ids = tokenizer.encode(doc["text"])
        assert tokenizer.decode(ids) == doc["text"], doc["id"]
    # A trained BPE compresses in-domain text well beyond one byte per token.
    chars = sum(len(d["text"]) for d in docs)
    tokens = sum(len(tokenizer.encode(d["text"])) for d in docs)
    assert chars / tokens > 2.5


def test_tokenizer_round_trips_arbitrary_text(tokenizer) -> None:
    text = "  tabs\tand\n\nnew lines, naïve café, 中文, emoji 😀, trailing space "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_held_out_files_reads_the_named_split() -> None:
    from moeshrink.evaluate.perplexity import held_out_files

    for split in ("validation", "test"):
        files = held_out_files(CORPUS, split=split)
        assert sorted(files) == sorted(DOMAINS)
        assert all(p.name == f"{split}.jsonl" for p in files.values())


def test_eval_command_takes_a_split() -> None:
    from moeshrink.cli import build_parser

    args = build_parser().parse_args(["eval", "model", "--split", "validation"])
    assert args.split == "validation"
    assert build_parser().parse_args(["eval", "model"]).split == "test"
