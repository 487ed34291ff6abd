"""The Hugging Face Hub without the network: downloads through huggingface_hub's own offline cache layout, uploads
up to the client call (HfApi.create_repo / upload_folder replaced by recorders)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from conftest import flip_byte, install, run_cli
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub import constants as hf_constants

import zoo
from zoo import hub, store
from zoo.registry import get_entry, registry

NAME = "baseline-resnet18-breastmnist"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """``folder`` as huggingface_hub caches a downloaded snapshot: ``models--org--repo/`` with ``blobs/<hash>``,
    ``snapshots/<commit>/<path>`` links to the blobs, and ``refs/<ref>`` holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder)
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache that huggingface_hub reads, offline (as HF_HUB_CACHE=... HF_HUB_OFFLINE=1 set it)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    # huggingface_hub reads both variables when imported (earlier in this process): set what they set
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _images(medmnist_root, n=4):
    return np.load(medmnist_root / "breastmnist.npz")["test_images"][:n]


# --------------------------------------------------------------------------------------------- downloads


def test_load_hf_hub_reference_downloads_once_verifies_and_loads(built_resnet18_breast, offline_cache,
                                                                 medmnist_root):
    repo = hub_cache(offline_cache, "org/breast", built_resnet18_breast)
    model = zoo.load("hf-hub:org/breast")
    d = hub.hub_dir("org/breast")
    assert d == store.zoo_home() / "hf-hub" / "org--breast@main" and d.is_dir()
    assert json.loads((d / "hub.json").read_text())["commit"] == COMMIT
    assert not any(p.is_symlink() for p in d.rglob("*"))  # real files, not links into the Hub's cache
    assert model.entry == get_entry(NAME)
    want = zoo.load(built_resnet18_breast).predict(_images(medmnist_root))
    np.testing.assert_array_equal(model.predict(_images(medmnist_root)).probs, want.probs)
    # once: the store's copy is used without the Hub's cache
    import shutil

    shutil.rmtree(repo)
    assert zoo.load("hf-hub:org/breast").entry.name == NAME


def test_revision_is_a_ref_of_the_cache(built_resnet18_breast, offline_cache):
    hub_cache(offline_cache, "org/breast", built_resnet18_breast, refs=("v1",))
    with pytest.raises(hub.HubError, match="cannot fetch hf-hub:org/breast from the Hugging Face Hub"):
        zoo.load("hf-hub:org/breast")  # no refs/main in the cache, offline
    zoo.load("hf-hub:org/breast@v1")
    assert (hub.hub_dir("org/breast", "v1") / "config.json").is_file()
    zoo.load(f"hf-hub:org/breast@{COMMIT}")  # a commit hash is its own snapshot folder


def test_registry_entry_with_hub_weights_is_fetched_into_its_store_folder(built_resnet18_breast, offline_cache,
                                                                          monkeypatch):
    hub_cache(offline_cache, "org/breast", built_resnet18_breast)
    monkeypatch.setitem(registry(), NAME, dataclasses.replace(get_entry(NAME), weights="hf-hub:org/breast"))
    assert not store.is_built(NAME)
    model = zoo.load(NAME)
    assert store.is_built(NAME) and model.entry.name == NAME
    assert json.loads((store.entry_dir(NAME) / "hub.json").read_text())["repo_id"] == "org/breast"


def test_registry_entry_must_match_what_the_repo_holds(built_resnet18_breast, offline_cache, monkeypatch):
    hub_cache(offline_cache, "org/breast", built_resnet18_breast)
    other = "baseline-resnet50-breastmnist"
    monkeypatch.setitem(registry(), other, dataclasses.replace(get_entry(other), weights="hf-hub:org/breast"))
    with pytest.raises(store.WeightsCorruptedError, match=f"holds {NAME}, which differs from the registry's {other}"):
        zoo.load(other)
    assert not store.entry_dir(other).exists()


def test_tampered_download_is_refused_and_not_stored(built_resnet18_breast, offline_cache):
    repo = hub_cache(offline_cache, "org/breast", built_resnet18_breast)
    flip_byte((repo / "snapshots" / COMMIT / "model.safetensors").resolve())
    with pytest.raises(store.WeightsCorruptedError) as ei:
        zoo.load("hf-hub:org/breast")
    msg = str(ei.value)
    assert msg.startswith("hf-hub:org/breast: sha256 mismatch for model.safetensors") and "\n" not in msg
    assert ".building." not in msg
    assert not hub.hub_dir("org/breast").exists()
    assert not any(p.name.startswith(".") for p in (store.zoo_home() / "hf-hub").iterdir())  # no staging left


def test_a_repo_without_zoo_config_is_not_an_entry(tmp_path, offline_cache):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "weights.bin").write_bytes(b"x")
    hub_cache(offline_cache, "org/plain", tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="hub repo org/plain holds no zoo config.json: not a zoo entry"):
        zoo.load("hf-hub:org/plain")
    assert list((store.zoo_home() / "hf-hub").iterdir()) == []  # no half-made entry, no .building. folder


@pytest.mark.parametrize("ref", ["hf-hub:nope", "hf-hub:a/b/c", "hf-hub:org/x@", "hf-hub:../x"])
def test_malformed_references_are_usage_errors(ref):
    from zoo.errors import UsageError

    with pytest.raises(UsageError):
        zoo.load(ref)


def test_cli_predict_from_the_hub_with_hf_home_and_offline_env(built_resnet18_breast, tmp_path, medmnist_root):
    from PIL import Image

    hub_cache(tmp_path / "hf_home" / "hub", "org/breast", built_resnet18_breast)  # HF_HOME/hub is the cache
    img = tmp_path / "x.png"
    Image.fromarray(_images(medmnist_root, 1)[0]).save(img)
    env = {"ZOO_HOME": os.environ["ZOO_HOME"], "MEDMNIST_ROOT": os.environ["MEDMNIST_ROOT"],
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    r = run_cli("predict", "hf-hub:org/breast", str(img), env=env)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert row["image"] == str(img) and set(row["probabilities"]) == {"malignant", "normal, benign"}
    r = run_cli("predict", "hf-hub:org/missing", str(img), env=env)
    assert r.returncode == 1 and r.stderr.startswith("zoo: error: cannot fetch hf-hub:org/missing from the "
                                                     "Hugging Face Hub (HF_HUB_OFFLINE is set")
    assert r.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------- uploads


class Recorder:
    """HfApi's repo, branch and upload calls, recorded; the upload reads the folder while it exists."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        rec = self

        def create_repo(self, repo_id, **kw):
            rec.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def create_branch(self, repo_id, **kw):
            rec.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            rec.calls.append(("upload_folder", kw))
            root = Path(kw["folder_path"])
            rec.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc",
                                              commit_message=kw["commit_message"], commit_description="", oid="abc")

        for name, fn in (("create_repo", create_repo), ("create_branch", create_branch),
                         ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)


def test_push_uploads_the_entry_folder_with_the_hub_card(built_resnet18_breast, monkeypatch, tmp_path):
    d = install(built_resnet18_breast)
    bundle = d / "export" / "onnx-int8"
    bundle.mkdir(parents=True)
    (bundle / "model.onnx").write_bytes(b"\0" * 2000)
    (bundle / "export.json").write_text(json.dumps({"format": "onnx-int8", "latency": {"ms": 0.5, "threads": 2}}))
    rec = Recorder(monkeypatch)
    res = hub.push(d, "org/breast", revision="v1", private=True)
    names = [c[0] for c in rec.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert rec.calls[0][1] == {"repo_id": "org/breast", "repo_type": "model", "private": True, "exist_ok": True}
    assert rec.calls[1][1] == {"repo_id": "org/breast", "branch": "v1", "repo_type": "model", "exist_ok": True}
    up = rec.calls[2][1]
    assert (up["repo_id"], up["revision"], up["repo_type"], up["delete_patterns"]) == ("org/breast", "v1", "model", "*")
    metrics = json.loads((d / "metrics.json").read_text())
    assert up["commit_message"] == (f"Upload {NAME} (medzoo {zoo.__version__}): test ACC {metrics['test']['acc']:.4f} "
                                    f"AUC {metrics['test']['auc']:.4f}")
    want = sorted(["README.md", "config.json", "config.yaml", "metrics.json", "model.safetensors",
                   "preprocessor_config.json", "export/onnx-int8/export.json", "export/onnx-int8/model.onnx"])
    assert sorted(rec.uploaded) == res.files == want
    for f in want[1:]:  # the entry's own bytes, untouched
        assert rec.uploaded[f] == (d / f).read_bytes()
    card = tmp_path / "README.md"
    card.write_bytes(rec.uploaded["README.md"])
    meta = metadata_load(card)
    assert meta["license"] == "cc-by-4.0" and meta["library_name"] == "medzoo"
    assert meta["pipeline_tag"] == "image-classification" and "medmnist" in meta["tags"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in ModelCard.load(card).data.eval_results}
    assert results[("test", "accuracy")] == metrics["test"]["acc"]
    assert results[("validation", "roc_auc")] == metrics["val"]["auc"]
    text = ModelCard.load(card).text
    assert 'zoo.load("hf-hub:org/breast")' in text and "0.5 ms/image" in text and "## Size and speed" in text
    assert res.url == "https://huggingface.co/org/breast/commit/abc" and res.revision == "v1"


def test_push_to_main_creates_no_branch(built_resnet18_breast, monkeypatch):
    rec = Recorder(monkeypatch)
    res = hub.push(install(built_resnet18_breast), "org/breast")
    assert [c[0] for c in rec.calls] == ["create_repo", "upload_folder"]
    assert rec.calls[0][1]["private"] is False and rec.calls[1][1]["revision"] == "main" and res.revision == "main"


def test_push_refuses_corrupted_weights(built_resnet18_breast, monkeypatch):
    d = install(built_resnet18_breast)
    flip_byte(d / "model.safetensors")
    rec = Recorder(monkeypatch)
    with pytest.raises(store.WeightsCorruptedError, match="sha256 mismatch"):
        hub.push(d, "org/breast")
    assert rec.calls == []


def test_dry_run_folder_is_what_a_download_loads(built_resnet18_breast, monkeypatch, tmp_path, offline_cache,
                                                 medmnist_root):
    d = install(built_resnet18_breast)
    rec = Recorder(monkeypatch)
    out = tmp_path / "dry"
    res = hub.push(d, "org/breast", dry_run=out)
    assert rec.calls == [] and res.folder == out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == res.files
    assert ModelCard.load(out / "README.md").data.base_model is None  # a baseline has no teacher
    with pytest.raises(Exception, match="not an empty folder"):
        hub.push(d, "org/breast", dry_run=out)
    # round trip: the pushed folder, as the Hub would serve it, loads and predicts as the local entry
    hub_cache(offline_cache, "org/breast", out)
    got = zoo.load("hf-hub:org/breast").predict(_images(medmnist_root)).probs
    np.testing.assert_array_equal(got, zoo.load(NAME).predict(_images(medmnist_root)).probs)


def test_push_client_errors_are_one_line(built_resnet18_breast, monkeypatch):
    def fail(self, repo_id, **kw):
        raise huggingface_hub.errors.LocalTokenNotFoundError("Token is required (`token=True`), but no token found.\n"
                                                              "Run `hf auth login`.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
    with pytest.raises(hub.HubError, match=r"^cannot push to org/breast: LocalTokenNotFoundError: Token is "
                                            r"required \(`token=True`\), but no token found.$"):
        hub.push(install(built_resnet18_breast), "org/breast")
