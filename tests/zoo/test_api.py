"""The user's path: zoo.load(...).predict(images) reproduces the card, takes every documented image
form, and fails clearly on bad names, missing builds, corrupted files and bad images."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, TASK_FLAG, flip_byte, install
from PIL import Image

import zoo
from zoo import registry as R
from zoo import store
from zoo.api import NotBuiltError, ZooModel
from zoo.inference import Prediction
from zoo.metrics import compute_metrics
from zoo.registry import UnknownModelError
from zoo.store import WeightsCorruptedError


def _npz(root, flag):
    return np.load(root / f"{flag}.npz")


def _metrics(d):
    return json.loads((d / "metrics.json").read_text())


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_predict_reproduces_card_metrics(tiny_runs, medmnist_root, task):
    d, flag = tiny_runs[task], TASK_FLAG[task]
    model = zoo.load(d)
    raw = _npz(medmnist_root, flag)
    card = _metrics(d)
    for split in ("val", "test"):
        pred = model.predict(raw[f"{split}_images"])  # the arrays exactly as MedMNIST ships them
        m = compute_metrics(raw[f"{split}_labels"], pred.probs, task)
        assert m["acc"] == card[split]["acc"]
        assert abs(m["auc"] - card[split]["auc"]) <= 1e-12


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_prediction_layout(tiny_runs, medmnist_root, task):
    flag = TASK_FLAG[task]
    model = zoo.load(tiny_runs[task])
    names = model.entry.labels
    imgs = _npz(medmnist_root, flag)["test_images"][:10]
    pred = model.predict(imgs)
    n_cls = SYNTHETIC[flag][2]
    assert isinstance(pred, Prediction) and len(pred) == 10 and pred.task == task
    assert isinstance(pred.probs, np.ndarray) and pred.probs.dtype == np.float32 and pred.probs.shape == (10, n_cls)
    assert ((pred.probs >= 0) & (pred.probs <= 1)).all()
    assert all(lab in names for lab in pred.labels)
    assert [names[i] for i in pred.indices] == pred.labels
    if task == "multi-label, binary-class":
        assert pred.label_sets == [[names[j] for j in range(n_cls) if row[j] > 0.5] for row in pred.probs]
        assert list(pred.indices) == list(pred.probs.argmax(1))
    else:
        np.testing.assert_allclose(pred.probs.sum(1), 1, rtol=1e-6)
        assert pred.label_sets == [[lab] for lab in pred.labels]
        want = (pred.probs[:, 1] > 0.5).astype(int) if task == "binary-class" else pred.probs.argmax(1)
        assert list(pred.indices) == list(want)


def _assert_same(a: Prediction, b: Prediction, exact=True):
    assert a.labels == b.labels
    if exact:
        np.testing.assert_array_equal(a.probs, b.probs)
    else:
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)


def test_predict_input_forms_grey_model(tiny_runs, medmnist_root):
    model = zoo.load(tiny_runs["binary-class"])
    imgs = _npz(medmnist_root, "breastmnist")["test_images"][:6]  # (N, 28, 28) uint8
    ref = model.predict(imgs)
    _assert_same(model.predict(imgs[..., None]), ref)  # (N, H, W, 1)
    _assert_same(model.predict(list(imgs)), ref)  # list of (H, W)
    _assert_same(model.predict([Image.fromarray(a, "L") for a in imgs]), ref)
    _assert_same(model.predict([Image.fromarray(a, "L").convert("RGB") for a in imgs]), ref)  # converted to L
    _assert_same(model.predict(torch.from_numpy(imgs)[:, None]), ref)  # (N, 1, H, W) uint8 tensor
    _assert_same(model.predict(torch.from_numpy(imgs)[:, None].float() / 255), ref)  # float tensor in [0, 1]
    _assert_same(model.predict(imgs.astype(np.float32) / 255), ref, exact=False)  # float (N, H, W)
    single = model.predict(imgs[0])  # one (H, W) image
    assert len(single) == 1 and single.labels == ref.labels[:1]
    np.testing.assert_allclose(single.probs, ref.probs[:1], rtol=1e-5, atol=1e-6)  # batch of 1 vs 6
    _assert_same(model.predict(torch.from_numpy(imgs[0])[None]), single)  # (C, H, W) tensor
    _assert_same(model.predict(Image.fromarray(imgs[0])), single)


def test_predict_input_forms_rgb_model(tiny_runs, medmnist_root):
    # (N, H, W, C) arrays reach the network channels-last, other forms contiguous: equal up to float noise
    model = zoo.load(tiny_runs["multi-class"])
    imgs = _npz(medmnist_root, "dermamnist")["test_images"][:6]  # (N, 28, 28, 3) uint8
    ref = model.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    _assert_same(model.predict(list(imgs)), ref)
    _assert_same(model.predict([Image.fromarray(a) for a in imgs]), ref)
    _assert_same(model.predict(torch.from_numpy(imgs).permute(0, 3, 1, 2).float().contiguous() / 255), ref)
    _assert_same(model.predict(imgs), ref, exact=False)
    _assert_same(model.predict(imgs.astype(np.float64) / 255), ref, exact=False)
    single = model.predict(imgs[2])  # (H, W, 3)
    np.testing.assert_allclose(single.probs, ref.probs[2:3], rtol=1e-5, atol=1e-6)  # batch of 1 vs 6
    # grey input to an RGB model is replicated: the same as replicating it by hand
    grey = imgs[..., 0]
    _assert_same(model.predict(grey), model.predict(list(np.repeat(grey[..., None], 3, axis=-1))))
    _assert_same(model.predict([Image.fromarray(g, "L") for g in grey]), model.predict(grey))


def test_rgb_array_batches_reach_the_model_contiguous(tiny_runs, medmnist_root):
    model = zoo.load(tiny_runs["multi-class"])
    layouts = []
    model.net.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous()) and None)
    model.predict(_npz(medmnist_root, "dermamnist")["test_images"])
    assert layouts == [True]


def test_predict_resizes_and_keeps_order_across_sizes(tiny_runs, medmnist_root):
    model = zoo.load(tiny_runs["binary-class"])
    imgs = _npz(medmnist_root, "breastmnist")["test_images"][:3]
    big = np.kron(imgs[1], np.ones((2, 2), np.uint8))  # a 56 px image
    pred = model.predict([imgs[0], big, imgs[2]])
    assert len(pred) == 3
    np.testing.assert_allclose(pred.probs[[0, 2]], model.predict(imgs[[0, 2]]).probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.probs[1:2], model.predict(big).probs, rtol=1e-5, atol=1e-6)
    assert pred.labels[1] == model.predict(big).labels[0]


def test_predict_batch_size_does_not_change_results(tiny_runs, medmnist_root):
    model = zoo.load(tiny_runs["ordinal-regression"])
    imgs = _npz(medmnist_root, "retinamnist")["test_images"]
    _assert_same(model.predict(imgs, batch_size=7), model.predict(imgs), exact=False)


@pytest.mark.parametrize("images,exc,match", [
    (np.zeros((28, 28, 3), np.uint8), ValueError, "takes 1-channel images .* got 3 channels"),
    (np.zeros((4, 28, 28, 3), np.uint8), ValueError, "got 3 channels; convert the images to greyscale"),
    (np.zeros(28, np.uint8), ValueError, "cannot read an array of shape \\(28,\\)"),
    (np.zeros((1, 2, 28, 28, 1), np.uint8), ValueError, "cannot read an array of shape"),
    (torch.zeros(1, 2, 1, 28, 28), ValueError, "cannot read a tensor of shape"),
    (np.full((28, 28), 2.0, np.float32), ValueError, "float images must hold values in \\[0, 1\\]"),
    (torch.full((1, 1, 28, 28), -0.5), ValueError, "float images must hold values in \\[0, 1\\]"),
    (np.zeros((28, 28), np.int32), ValueError, "must be uint8 .* got dtype int32"),
    (torch.zeros(1, 1, 28, 28, dtype=torch.int64), ValueError, "must be uint8 or float"),
    ("image.png", TypeError, "cannot read str as an image"),
    ([], ValueError, "empty list"),
    (np.zeros((0, 28, 28, 1), np.uint8), ValueError, "empty image batch"),
])
def test_predict_bad_input(tiny_runs, images, exc, match):
    model = zoo.load(tiny_runs["binary-class"])
    with pytest.raises(exc, match=match):
        model.predict(images)


def test_load_by_name_and_evaluate(built_resnet18_breast):
    install(built_resnet18_breast)
    model = zoo.load("baseline-resnet18-breastmnist")
    assert isinstance(model, ZooModel) and not model.training
    assert model.entry == zoo.get_entry("baseline-resnet18-breastmnist")
    assert model.info["sha256"]["model.safetensors"] == store.sha256_file(built_resnet18_breast / "model.safetensors")
    r = zoo.evaluate(model)
    card = _metrics(built_resnet18_breast)
    assert (r["acc"], r["auc"]) == (card["test"]["acc"], card["test"]["auc"])
    assert (r["n"], r["split"], r["dataset"], r["model"]) == (48, "test", "breastmnist", model.entry.name)
    assert r["probs"].shape == (48, 2)
    assert zoo.evaluate("baseline-resnet18-breastmnist", split="val")["auc"] == card["val"]["auc"]
    x = torch.zeros(2, 1, 28, 28)
    assert torch.equal(model(x), model.net(x))


def test_linear_entry_loads_and_predicts(built_linear_breast, medmnist_root):
    install(built_linear_breast)
    model = zoo.load("linear-dinov2-vits14-breastmnist")
    assert model.entry.in_chans == 3 and not model.entry.is_student
    raw = _npz(medmnist_root, "breastmnist")
    pred = model.predict(raw["test_images"])  # grey images into an RGB ViT
    m = compute_metrics(raw["test_labels"], pred.probs, "binary-class")
    assert m["acc"] == _metrics(built_linear_breast)["test"]["acc"]
    assert abs(m["auc"] - _metrics(built_linear_breast)["test"]["auc"]) <= 1e-12


def test_unknown_name_lists_close_names():
    with pytest.raises(UnknownModelError) as ei:
        zoo.load("baseline-resnet18-bloodmnst")
    assert "Closest: baseline-resnet18-bloodmnist" in str(ei.value)


def test_known_but_unbuilt_entry():
    with pytest.raises(NotBuiltError) as ei:
        zoo.load("medalmighty-seresnet50-octmnist")
    msg = str(ei.value)
    assert "zoo build medalmighty-seresnet50-octmnist" in msg and str(store.zoo_home()) in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_corrupted_weights(built_resnet18_breast):
    d = install(built_resnet18_breast)
    flip_byte(d / "model.safetensors")
    with pytest.raises(WeightsCorruptedError, match="sha256 mismatch .*zoo build baseline-resnet18-breastmnist"):
        zoo.load("baseline-resnet18-breastmnist")


def test_corrupted_backbone_of_linear_entry(built_linear_breast):
    d = install(built_linear_breast)
    flip_byte(d / "backbone" / "model.safetensors")
    with pytest.raises(WeightsCorruptedError, match="sha256 mismatch for .*backbone/model.safetensors"):
        zoo.load("linear-dinov2-vits14-breastmnist")


def test_missing_recorded_weight_file(built_linear_breast):
    d = install(built_linear_breast)
    shutil.rmtree(d / "backbone")
    with pytest.raises(WeightsCorruptedError, match="is missing"):
        zoo.load(d)


def test_unreadable_config(built_resnet18_breast):
    d = install(built_resnet18_breast)
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsCorruptedError, match="cannot read .*config.json"):
        zoo.load("baseline-resnet18-breastmnist")


def test_build_unknown_config_key_from_api():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'.*did you mean train.lr"):
        zoo.build("baseline-resnet18-breastmnist", ["train.lrr=0.1"])


# --- published entries (hf-hub:) --------------------------------------------------------------------


@pytest.fixture
def hub_entry(monkeypatch, built_resnet18_breast):
    """``baseline-resnet18-breastmnist`` published as ``hf-hub:org/repo@rev``; the hub is a local copy."""
    name = "baseline-resnet18-breastmnist"
    monkeypatch.setitem(R.registry(), name, dataclasses.replace(R.get_entry(name), weights="hf-hub:org/repo@rev1"))
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kw):  # the Hub returns its cached snapshot folder
        calls.append((repo_id, revision))
        return str(built_resnet18_breast)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return name, calls


def test_load_fetches_published_entry_once(hub_entry, built_resnet18_breast, medmnist_root):
    name, calls = hub_entry
    model = zoo.load(name)
    assert calls == [("org/repo", "rev1")]
    assert store.is_built(name)
    raw = _npz(medmnist_root, "breastmnist")
    m = compute_metrics(raw["test_labels"], model.predict(raw["test_images"]).probs, "binary-class")
    assert m["acc"] == _metrics(built_resnet18_breast)["test"]["acc"]
    zoo.load(name)
    assert len(calls) == 1  # now in the store
    assert [p.name for p in store.zoo_home().iterdir()] == [name]


def test_hub_repo_without_zoo_config(monkeypatch, tmp_path):
    name = "baseline-resnet18-breastmnist"
    monkeypatch.setitem(R.registry(), name, dataclasses.replace(R.get_entry(name), weights="hf-hub:org/empty"))
    import huggingface_hub

    empty = tmp_path / "snapshot"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, **kw: str(empty))
    with pytest.raises(FileNotFoundError, match="hub repo org/empty holds no zoo config.json"):
        zoo.load(name)
    assert list(store.zoo_home().iterdir()) == []  # no half-made entry, no .building. folder
