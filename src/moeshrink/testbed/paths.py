"""Where the packaged testbed pieces live."""

from __future__ import annotations

from pathlib import Path

from moeshrink.errors import MoeShrinkError

DATA = Path(__file__).resolve().parent / "data"
DOMAINS = ("wiki", "shakespeare", "pydoc", "bible")


def testbed_model_dir() -> Path:
    path = DATA / "moeshrink-tiny"
    if not (path / "config.json").is_file():
        raise MoeShrinkError(
            f"the testbed model is missing from {path}: rebuild it with `moeshrink testbed train`"
        )
    return path


def corpus_dir() -> Path:
    return DATA / "corpus"


def tasks_dir() -> Path:
    return DATA / "tasks"


def tokenizer_dir() -> Path:
    return DATA / "tokenizer"
