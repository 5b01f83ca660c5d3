"""Calibration text -> a deterministic ``[samples, seq_len]`` block of token ids.

Sources: plain text files (one document per file), JSONL (one document per line, text in a chosen
field), local Hugging Face ``datasets`` directories (``save_to_disk``) and datasets named the way
``datasets.load_dataset`` names them (a Hub id with a config and split, or a local data folder; the
datasets cache first). Chat-formatted rows (a list of ``{"role", "content"}`` messages) are rendered
with the tokenizer's chat template. Documents are tokenised, joined with the end-of-text token, cut
into non-overlapping windows of ``seq_len`` tokens, and ``samples`` windows are drawn with a seeded
generator.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeshrink.errors import MoeShrinkError


@dataclass
class CalibrationData:
    """Token ids for calibration and what they were made from."""

    input_ids: torch.Tensor
    sha256: str
    info: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


# A document: text, or (rendered with the tokenizer's chat template) a list of {"role", "content"} messages.
Document = str | list[dict[str, Any]]


@dataclass(frozen=True)
class DatasetName:
    """A calibration set as ``datasets.load_dataset`` names it: a Hub id (``org/name``) or a local data
    folder, a config and a split (None: ``train`` when there is one, else the first)."""

    name: str
    config: str | None = None
    split: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "config": self.config, "split": self.split}


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def check_calibration_files(paths: Sequence[str | Path]) -> None:
    """Each path is a saved datasets directory or a file of UTF-8 text (checked before anything is
    loaded; a text or JSONL file is read through once)."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MoeShrinkError(f"calibration file not found: {path}")
        if path.is_dir():
            if not _is_hf_dataset_dir(path):
                raise MoeShrinkError(
                    f"{path} is a directory but not a saved datasets directory: pass text/JSONL files instead"
                )
            continue
        check_utf8_text(path)


def check_utf8_text(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 text: binary data (a NUL byte: also UTF-16 text) or another
    encoding (invalid UTF-8). Read as text, either would calibrate on replacement characters."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            nul = data.find(0)
            if nul >= 0:
                raise MoeShrinkError(
                    f"{path}: not text (a NUL byte at byte {offset + nul}: binary data or UTF-16): "
                    "calibration files must be UTF-8 text; pass the text itself or convert it"
                )
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise MoeShrinkError(
                    f"{path}: not UTF-8 text (byte {offset - pending + e.start}: another encoding or binary "
                    "data): calibration files must be UTF-8; convert it (e.g. iconv -f latin1 -t utf-8)"
                ) from e
            if not data:
                return
            offset += len(data)


def read_documents(
    paths: Sequence[str | Path], text_field: str = "text", chat: bool = False
) -> list[Document]:
    """Read documents from text files, JSONL files or a local datasets directory (``chat``: the field
    holds chat messages, not text)."""
    check_calibration_files(paths)
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if _is_hf_dataset_dir(path):
            docs.extend(_read_hf_dataset(path, text_field, chat))
        elif path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path, text_field, chat))
        elif chat:
            raise MoeShrinkError(
                f"{path}: --chat-template reads chat messages from JSONL or datasets, not text files"
            )
        else:
            docs.append(path.read_text(encoding="utf-8"))  # checked to be UTF-8 above
    return _nonempty(docs, ", ".join(map(str, paths)))


def _nonempty(docs: list[Document], where: str) -> list[Document]:
    docs = [d for d in docs if (d.strip() if isinstance(d, str) else d)]
    if not docs:
        raise MoeShrinkError(f"calibration text is empty: {where} holds no text")
    return docs


def is_chat(value: Any) -> bool:
    """A list of chat messages: dicts with a string ``role`` and ``content``."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _field_error(where: str, field: str, value: Any, chat: bool) -> str | None:
    """Why ``value`` (a record's ``field``) is not a document, or None when it is one."""
    if chat:
        if is_chat(value):
            return None
        return (
            f'{where}: field \'{field}\' holds no chat messages (a list of {{"role", "content"}}); '
            "choose the field with --calib-field"
        )
    if isinstance(value, str):
        return None
    if is_chat(value):
        return f"{where}: field '{field}' holds chat messages: add --chat-template to render them with the tokenizer's"
    return f"{where}: no text field '{field}'; choose the field with --calib-field"


def _read_jsonl(path: Path, text_field: str, chat: bool = False) -> list[Document]:
    try:
        return _parse_jsonl(path, text_field, chat)
    except UnicodeDecodeError as e:
        raise MoeShrinkError(
            f"{path}: not UTF-8 text (byte {e.start}): JSONL calibration files must be UTF-8; convert it"
        ) from e


def _parse_jsonl(path: Path, text_field: str, chat: bool = False) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoeShrinkError(
                    f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line"
                ) from e
            value = record.get(text_field) if isinstance(record, dict) else None
            problem = _field_error(f"{path}:{number}", text_field, value, chat)
            if problem:
                raise MoeShrinkError(problem)
            docs.append(value)
    return docs


def _read_hf_dataset(path: Path, text_field: str, chat: bool = False) -> list[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return _column(ds, str(path), text_field, chat)


def _column(ds: Any, where: str, field: str, chat: bool) -> list[Document]:
    """The documents in column ``field`` of a ``datasets.Dataset``: its strings (rows of another type
    are skipped), or with ``chat`` its message lists (every row must be one)."""
    if field not in ds.column_names:
        raise MoeShrinkError(
            f"{where}: no column '{field}' (columns: {', '.join(ds.column_names)}); choose it with --calib-field"
        )
    values = list(ds[field])
    if chat:
        for row, value in enumerate(values):
            problem = _field_error(f"{where} row {row}", field, value, chat)
            if problem:
                raise MoeShrinkError(problem)
        return values
    docs = [t for t in values if isinstance(t, str)]
    if not docs and values and is_chat(values[0]):
        raise MoeShrinkError(_field_error(where, field, values[0], chat))
    return docs


def _dataset_error(source: DatasetName, error: Exception) -> MoeShrinkError:
    """One line for a calibration dataset that datasets could not resolve or load."""
    import datasets

    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    name = source.name
    if isinstance(error, ConnectionError):
        cache = datasets.config.HF_DATASETS_CACHE
        if datasets.config.HF_HUB_OFFLINE:
            return MoeShrinkError(
                f"calibration dataset {name} is not in the datasets cache ({cache}) and HF_HUB_OFFLINE is set: "
                "load it once with network access (it is cached then), or give a local data folder or --calib FILE"
            )
        return MoeShrinkError(
            f"calibration dataset {name}: not in the datasets cache ({cache}) and the Hub could not be reached "
            f"({reason}); check the network, or give a local data folder or --calib FILE"
        )
    return MoeShrinkError(f"calibration dataset {name}: {reason}")


def check_calibration_dataset(source: DatasetName, field: str, chat: bool) -> DatasetName:
    """Resolve a named calibration set without loading its rows (the datasets cache first): the name,
    the config, the split (returned chosen when the split names are known) and the field when the
    dataset declares its columns."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(source.name, source.config)
    except (OSError, ValueError, ImportError, RuntimeError, datasets.exceptions.DatasetsError) as e:
        raise _dataset_error(source, e) from e
    splits = list(builder.info.splits or [])
    split = source.split
    if splits and split is not None and split not in splits:
        raise MoeShrinkError(
            f"calibration dataset {source.name}: no split '{split}' (splits: {', '.join(splits)}); "
            "choose one with --calib-split"
        )
    if splits and split is None:
        split = "train" if "train" in splits else splits[0]
    features = builder.info.features
    if features is not None and field not in features:
        raise MoeShrinkError(
            f"calibration dataset {source.name}: no column '{field}' (columns: {', '.join(features)}); "
            f"choose it with --calib-field{' (chat messages)' if chat else ''}"
        )
    return DatasetName(source.name, source.config, split)


def read_dataset_documents(source: DatasetName, field: str, chat: bool = False) -> list[Document]:
    """The documents of a named calibration set (see :func:`check_calibration_dataset`)."""
    import datasets

    try:
        ds = datasets.load_dataset(source.name, source.config, split=source.split)
    except (OSError, ValueError, ImportError, RuntimeError, datasets.exceptions.DatasetsError) as e:
        raise _dataset_error(source, e) from e
    if isinstance(ds, datasets.DatasetDict):  # the split names were unknown before loading
        ds = ds["train" if "train" in ds else next(iter(ds))]
    return _nonempty(_column(ds, f"calibration dataset {source.name}", field, chat), source.name)


def render_chat(tokenizer: Any, docs: Sequence[Document]) -> list[str]:
    """Chat documents as text through the tokenizer's chat template (text documents pass through)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise MoeShrinkError("--chat-template: this model's tokenizer has no chat template")
    return [d if isinstance(d, str) else tokenizer.apply_chat_template(d, tokenize=False) for d in docs]


def tokenize_documents(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """One stream of token ids: each document followed by the end-of-text token (when there is one)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    # verbose=False: whole documents are longer than model_max_length on purpose; they are cut later.
    for encoded in tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_calibration(
    tokenizer,
    paths: Sequence[str | Path] | None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
    *,
    dataset: DatasetName | None = None,
    chat: bool = False,
) -> CalibrationData:
    """Draw ``samples`` windows of ``seq_len`` tokens from the calibration text (``paths``, or the named
    ``dataset``), deterministically; ``chat``: render chat messages with the tokenizer's chat template."""
    if samples < 1 or seq_len < 2:
        raise MoeShrinkError(f"need samples >= 1 and seq-len >= 2, got samples={samples}, seq-len={seq_len}")
    if dataset is not None:
        docs = read_dataset_documents(dataset, text_field, chat)
    else:
        docs = read_documents(paths or [], text_field, chat)
    if chat:
        docs = render_chat(tokenizer, docs)
    stream = tokenize_documents(tokenizer, docs)
    windows = stream.numel() // seq_len
    if windows < samples:
        raise MoeShrinkError(
            f"calibration text too short: {stream.numel()} tokens make {windows} windows of {seq_len}, "
            f"{samples} asked; give more text or lower --samples / --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:samples].sort().values
    input_ids = stream[: windows * seq_len].view(windows, seq_len)[chosen].contiguous()
    digest = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
    source = (
        {"dataset": dataset.to_dict()} if dataset is not None else {"files": [str(p) for p in paths or []]}
    )
    info = {
        **source,
        **({"chat_template": True} if chat else {}),
        "text_field": text_field,
        "documents": len(docs),
        "tokens_available": int(stream.numel()),
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "sha256": digest,
    }
    return CalibrationData(input_ids=input_ids, sha256=digest, info=info)
