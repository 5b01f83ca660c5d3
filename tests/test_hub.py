"""Models and calibration sets by their Hub names, offline: a Hugging Face cache laid out as
huggingface_hub leaves a download (blobs, snapshots/<commit>, refs) and a datasets cache as datasets
leaves a dataset it loaded once, both written by the tests; local data folders by name; chat-formatted
rows rendered with the tokenizer's chat template."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moeshrink.cli import main
from moeshrink.engine.data import DatasetName, build_calibration
from moeshrink.errors import MoeShrinkError
from moeshrink.io.checkpoint import content_fingerprint, load_tokenizer
from moeshrink.plan import PLAN_FILENAME, ModelPlan
from moeshrink.testbed.tiny import build_tiny_model

REPO = "org/tiny-mixtral"
MAIN = "a" * 40
V1 = "b" * 40
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def cache_model(
    cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """``source``'s files as huggingface_hub caches a downloaded snapshot: blobs named by their hash,
    the snapshot's files symlinks to them, each ref a file naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_dataset(cache: Path, repo_id: str, configs: dict[str, dict[str, list[dict]]], work: Path) -> None:
    """A Hub dataset as datasets leaves one it has loaded once: Arrow files per config and split under
    ``cache`` (HF_DATASETS_CACHE), which ``load_dataset(repo_id, config)`` reads offline."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    for config, splits in configs.items():
        files = {}
        for split, rows in splits.items():
            files[split] = str(work / f"{config}-{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        builder = Json(
            cache_dir=str(cache),
            dataset_name=f"{namespace}___{name}",
            config_name=config,
            config_id=config,
            data_files=files,
            hash="0123456789abcdef",
        )
        builder.download_and_prepare()
        for arrow in Path(builder.cache_dir).glob(f"{namespace}___{name}-*.arrow"):
            arrow.rename(arrow.with_name(arrow.name.replace(f"{namespace}___", "", 1)))


def paragraphs(calib_file: Path) -> list[str]:
    return [p for p in calib_file.read_text().split("\n\n") if p.strip()][:200]


def chat_rows(calib_file: Path) -> list[dict]:
    texts = paragraphs(calib_file)
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(texts[::2], texts[1::2], strict=False)
    ]


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory, calib_file) -> dict[str, Path]:
    """A Hub cache holding REPO at two commits (main, and tag v1 with other weights) and a datasets
    cache holding org/calib (configs text and chat)."""
    root = tmp_path_factory.mktemp("hub")
    sources = {}
    for commit, seed in ((MAIN, 1), (V1, 2)):
        sources[commit] = build_tiny_model("mixtral", root / f"src-{seed}", seed=seed)
        (sources[commit] / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cache_model(root / "hub", REPO, sources[MAIN], MAIN)
    cache_model(root / "hub", REPO, sources[V1], V1, refs=("v1",))
    rows = {"text": {"train": [{"text": t} for t in paragraphs(calib_file)]}}
    rows["chat"] = {"train": chat_rows(calib_file), "test": chat_rows(calib_file)[:4]}
    cache_dataset(root / "datasets", "org/calib", rows, root)
    return {"hub": root / "hub", "datasets": root / "datasets", "main": sources[MAIN], "v1": sources[V1]}


@pytest.fixture
def offline(hub_dirs, monkeypatch, tmp_path) -> dict[str, Path]:
    """This process offline, with the test caches as its Hugging Face caches."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_dirs["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hub_dirs


def prune_argv(model: str, out: Path, *extra: str) -> list[str]:
    return ["prune", model, "--method", "frequency", "--keep", "4", *extra, "-o", str(out)] + [
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--quiet",
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeshrink: error: ") and len(err.splitlines()) == 1, err
    return err


def test_a_hub_id_is_read_from_the_cache_offline_and_recorded_in_the_plan(
    offline, calib_file, tmp_path, capsys
):
    assert main(["inspect", REPO]) == 0
    assert "mixtral" in capsys.readouterr().out
    assert main(prune_argv(REPO, tmp_path / "out", "--calib", str(calib_file))) == 0
    plan = ModelPlan.model_validate_json((tmp_path / "out" / PLAN_FILENAME).read_text())
    assert plan.source["hub"] == {"repo_id": REPO, "commit": MAIN}
    assert plan.source["content_sha256"] == content_fingerprint(offline["main"])


@pytest.mark.parametrize("revision", ["v1", V1])
def test_revision_picks_a_tag_or_a_commit(revision, offline, calib_file, tmp_path):
    argv = prune_argv(REPO, tmp_path / "out", "--revision", revision, "--calib", str(calib_file))
    assert main(argv) == 0
    plan = ModelPlan.model_validate_json((tmp_path / "out" / PLAN_FILENAME).read_text())
    assert plan.source["hub"]["commit"] == V1
    assert plan.source["content_sha256"] == content_fingerprint(offline["v1"])


def test_not_cached_and_offline_is_one_line_that_says_so(offline, tmp_path, capsys):
    assert main(["inspect", "org/absent"]) == 2
    err = one_line_error(capsys)
    assert "org/absent" in err and "HF_HUB_OFFLINE is set" in err and "hf download org/absent" in err
    assert main(["inspect", REPO, "--revision", "nope"]) == 2
    assert "at revision nope" in one_line_error(capsys)


def test_not_cached_and_no_network_is_one_line_that_says_so(offline, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["inspect", "org/absent"]) == 2
    err = one_line_error(capsys)
    assert "org/absent" in err and "could not be downloaded" in err


def test_an_incomplete_snapshot_offline_names_what_is_missing(offline, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(offline["main"] / "config.json", partial / "config.json")
    cache_model(Path(offline["hub"]), "org/partial", partial, MAIN)
    assert main(["inspect", "org/partial"]) == 2
    assert "incompletely (model.safetensors missing)" in one_line_error(capsys)


def test_revision_with_a_local_directory_is_refused(checkpoints, capsys):
    assert main(["inspect", str(checkpoints["mixtral"]), "--revision", "main"]) == 2
    assert "is a local path" in one_line_error(capsys)


def test_a_local_data_folder_by_name_with_split_and_field(offline, checkpoints, calib_file, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    texts = paragraphs(calib_file)
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:100]))
    (folder / "test.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[100:]))
    model = str(checkpoints["mixtral"])
    extra = ["--calib-dataset", str(folder), "--calib-split", "test", "--calib-field", "body"]
    assert main(prune_argv(model, tmp_path / "out", *extra)) == 0
    plan = ModelPlan.model_validate_json((tmp_path / "out" / PLAN_FILENAME).read_text())
    assert plan.calibration["dataset"] == {"name": str(folder), "config": None, "split": "test"}
    assert plan.calibration["text_field"] == "body" and "files" not in plan.calibration
    # the same rows as a JSONL file calibrate on the same tokens
    same = tmp_path / "same.jsonl"
    same.write_text((folder / "test.jsonl").read_text())
    tokenizer = load_tokenizer(checkpoints["mixtral"])
    by_file = build_calibration(tokenizer, [same], 4, 32, text_field="body")
    assert by_file.sha256 == plan.calibration["sha256"]


def test_hub_dataset_configs_and_splits_from_the_datasets_cache(offline, monkeypatch, checkpoints):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", offline["datasets"])
    tokenizer = load_tokenizer(checkpoints["mixtral"])
    text = build_calibration(tokenizer, None, 4, 32, dataset=DatasetName("org/calib", "text", "train"))
    assert text.info["dataset"] == {"name": "org/calib", "config": "text", "split": "train"}
    with pytest.raises(MoeShrinkError, match="add --chat-template"):
        build_calibration(
            tokenizer, None, 4, 32, text_field="messages", dataset=DatasetName("org/calib", "chat")
        )


def test_check_names_split_column_and_config_problems_in_one_line(
    offline, monkeypatch, calib_file, tmp_path, capsys
):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", offline["datasets"])
    cases = [
        (
            ["--calib-dataset", "org/calib", "--calib-config", "chat", "--calib-split", "dev"],
            "no split 'dev'",
        ),
        (
            ["--calib-dataset", "org/calib", "--calib-config", "text", "--calib-field", "body"],
            "no column 'body'",
        ),
        (["--calib-dataset", "org/calib", "--calib-config", "nope"], "config 'nope'"),
        (["--calib-dataset", "org/absent"], "HF_HUB_OFFLINE is set"),
        (["--calib-dataset", "org/calib", "--calib", str(calib_file)], "not both"),
        (["--calib", str(calib_file), "--calib-split", "train"], "give it too"),
    ]
    for extra, message in cases:
        assert main(prune_argv(REPO, tmp_path / "out", *extra)) == 2, extra
        err = one_line_error(capsys)
        assert message in err, (extra, err)
        assert not (tmp_path / "out").exists()


def test_chat_rows_are_rendered_with_the_chat_template(offline, checkpoints, calib_file, tmp_path, capsys):
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(calib_file)))
    tokenizer = load_tokenizer(offline["main"])
    data = build_calibration(tokenizer, [rows], 4, 32, text_field="messages", chat=True)
    assert data.info["chat_template"] is True
    # the same as calibrating on the rendered conversations as text
    rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(calib_file)]
    assert rendered[0].startswith("<|user|>") and "\n<|assistant|>" in rendered[0]
    as_text = tmp_path / "rendered.jsonl"
    as_text.write_text("".join(json.dumps({"text": t}) + "\n" for t in rendered))
    assert build_calibration(tokenizer, [as_text], 4, 32).sha256 == data.sha256
    # without --chat-template the messages are refused, not flattened to their repr
    out = tmp_path / "out"
    assert main(prune_argv(REPO, out, "--calib", str(rows), "--calib-field", "messages")) == 2
    assert "add --chat-template" in one_line_error(capsys)
    # a tokenizer without a chat template is refused before anything is loaded
    plain = str(checkpoints["mixtral"])
    assert main(prune_argv(plain, out, "--calib", str(rows), "--chat-template")) == 2
    assert "has no chat template" in one_line_error(capsys)


def test_hub_model_and_hub_dataset_offline_end_to_end(hub_dirs, tmp_path):
    """The command as a user runs it, offline: a Hub id at a tag, a Hub dataset's chat config through
    the chat template, the output verified in a fresh process."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_dirs["hub"]),
        "HF_DATASETS_CACHE": str(hub_dirs["datasets"]),
        "HF_HOME": str(tmp_path / "hf-home"),
        "MOESHRINK_VERIFY": "1",
    }
    argv = prune_argv(REPO, tmp_path / "out", "--revision", "v1", "--calib-dataset", "org/calib")
    argv += ["--calib-config", "chat", "--calib-split", "train", "--chat-template"]
    proc = subprocess.run(
        [sys.executable, "-m", "moeshrink", *argv], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = ModelPlan.model_validate_json((tmp_path / "out" / PLAN_FILENAME).read_text())
    assert plan.source["hub"] == {"repo_id": REPO, "commit": V1}
    assert plan.calibration["dataset"] == {"name": "org/calib", "config": "chat", "split": "train"}
    assert plan.calibration["chat_template"] is True and plan.calibration["text_field"] == "messages"
    assert plan.verification["transformers"]["status"] == "pass"
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"base_model: {REPO}" in card and f"from `{REPO}` at commit `{V1[:12]}`" in card
    assert "the dataset `org/calib` (config chat, split train, rendered with the chat template)" in card


def test_apply_a_plan_to_the_hub_revision_it_was_made_from(offline, calib_file, tmp_path, capsys):
    assert main(prune_argv(REPO, tmp_path / "pruned", "--revision", "v1", "--calib", str(calib_file))) == 0
    plan = str(tmp_path / "pruned" / PLAN_FILENAME)
    assert main(["apply", REPO, "--revision", "v1", "--plan", plan, "-o", str(tmp_path / "again")]) == 0
    same = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert same == (tmp_path / "pruned" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["apply", REPO, "--plan", plan, "-o", str(tmp_path / "main")]) == 2  # main is another commit
    assert "not the checkpoint this plan was made from" in one_line_error(capsys)
