"""Models named the way transformers names them: ``org/name`` (and a ``revision``) on the Hugging Face
Hub, resolved through huggingface_hub's cache.

The cache comes first: a snapshot already there (with its config and every weight file) is used
without touching the network. Otherwise the checkpoint's files (config, tokenizer, safetensors; no
``.bin``, ``.gguf`` or ``original/`` copies) are downloaded into the cache, unless ``HF_HUB_OFFLINE``
is set. Every failure is one line that says what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moeshrink.errors import MoeShrinkError

# What a checkpoint needs; the rest of a repository (other weight formats, originals) is not downloaded.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
IGNORE_PATTERNS = ["original/*", "consolidated*", "*.gguf", "onnx/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(name: str | Path) -> bool:
    """``org/name`` as the Hub spells repository ids (a path with one slash that does not exist locally
    is read as one; an absolute, ``./`` or ``~`` path never is)."""
    text = str(name)
    return bool(_HUB_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _missing_files(folder: Path) -> list[str]:
    """The files a checkpoint needs that ``folder`` lacks: config.json and every weight file."""
    if not (folder / "config.json").is_file():
        return ["config.json"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except json.JSONDecodeError:
            return [index.name]
        return [s for s in shards if not (folder / s).is_file()]
    return [] if (folder / "model.safetensors").is_file() else ["model.safetensors"]


def _cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path | None, list[str]]:
    """The cached snapshot of ``repo_id`` at ``revision`` (None when there is none) and the checkpoint
    files it lacks."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=True,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except LocalEntryNotFoundError as e:  # not cached, or cached incompletely (IncompleteSnapshotError)
        snapshot = getattr(e, "snapshot_path", None)
        if snapshot is None:
            return None, []
        return Path(snapshot), _missing_files(Path(snapshot)) or ["files the Hub lists"]
    return Path(folder), _missing_files(Path(folder))


def resolve_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of the Hub model ``repo_id`` at ``revision`` (default: main), from the cache
    or downloaded into it; a one-line error when that cannot be done."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    cached, missing = _cached_snapshot(repo_id, revision)
    if cached is not None and not missing:
        return cached
    where = f"no local directory {repo_id}, and the Hugging Face cache ({_hub_cache()}) does not hold it{at}"
    if cached is not None:
        where = f"the Hugging Face cache holds {repo_id}{at} incompletely ({', '.join(missing[:3])} missing)"
    if hub_offline():
        raise MoeShrinkError(
            f"{where}; HF_HUB_OFFLINE is set, so it is not downloaded: download it with network access "
            f"(`hf download {repo_id}`), unset HF_HUB_OFFLINE, or give a local checkpoint directory"
        )
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
        )
    except GatedRepoError as e:
        raise MoeShrinkError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the Hub, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from e
    except RevisionNotFoundError as e:
        raise MoeShrinkError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from e
    except RepositoryNotFoundError as e:
        raise MoeShrinkError(
            f"{where}, and the Hub has no model {repo_id} (or it is private: log in with `hf auth login`)"
        ) from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:  # no network, Hub down, disk
        lines = str(e).strip().splitlines()
        reason = lines[0].removeprefix("Got: ") if lines else type(e).__name__
        raise MoeShrinkError(
            f"{where}, and it could not be downloaded ({reason}): check the network, or download it "
            f"elsewhere and copy the cache, or give a local checkpoint directory"
        ) from e
    missing = _missing_files(Path(folder))
    if missing:
        raise MoeShrinkError(
            f"{repo_id}{at} holds no complete safetensors checkpoint ({', '.join(missing[:3])} missing): "
            "moeshrink reads config.json and safetensors weights"
        )
    return Path(folder)


def hub_source(path: Path) -> dict[str, Any] | None:
    """The repository id and commit of a snapshot in a Hugging Face cache, or None for another folder."""
    resolved = path.resolve() if path.exists() else path
    snapshots = resolved.parent
    repo = snapshots.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return {"repo_id": repo.name.removeprefix("models--").replace("--", "/"), "commit": resolved.name}
