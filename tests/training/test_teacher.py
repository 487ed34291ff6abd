"""Frozen teachers: features and logits computed once, cached under a hash of what produced them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import install, write_medmnist_npz

from training.config import load_config
from training.medalmighty import teacher as T
from training.medalmighty.config import parse
from zoo.backbones import ViTBackbone
from zoo.data import SPLITS, load_split


def _cfg(backbone, *overrides, **data):
    """The typed recipe config the teacher functions take (``overrides`` as key=value)."""
    cfg = load_config(None, [f"teacher.backbone={backbone}", "data.download=false", *overrides],
                      family="medalmighty")
    cfg["data"].update(data)
    return parse(cfg)


def _splits(flag="breastmnist", root=None):
    return {s: load_split(flag, s, root=root, download=False) for s in SPLITS}


def _forbid_backbone(monkeypatch):
    def boom(self, x):
        raise AssertionError("the backbone ran although its features are cached")

    monkeypatch.setattr(ViTBackbone, "forward", boom)


def test_load_teacher_from_directory(tiny_teacher_dir):
    t = T.load_teacher(_cfg(tiny_teacher_dir))
    assert t.head is None and t.source == str(tiny_teacher_dir)
    assert (t.prep.input_size, t.prep.in_chans) == (28, 3)
    assert t.backbone.pooling == "cls+mean" and len(t.sha256) == 64


def test_features_computed_once_then_cached(tiny_teacher_dir, monkeypatch):
    cfg = _cfg(tiny_teacher_dir)
    teacher, splits = T.load_teacher(cfg), _splits()
    first = T.features(teacher, splits, cfg, progress=False)
    assert {s: f.shape for s, f in first.items()} == {s: (len(splits[s]), 64) for s in SPLITS}
    files = list(T.cache_dir().glob("features-*.safetensors"))
    assert len(files) == 1
    _forbid_backbone(monkeypatch)
    second = T.features(T.load_teacher(cfg), splits, cfg, progress=False)
    for s in SPLITS:
        assert torch.equal(first[s], second[s])
    assert list(T.cache_dir().glob("features-*.safetensors")) == files


def test_features_equal_backbone_output(tiny_teacher_dir):
    cfg = _cfg(tiny_teacher_dir)
    teacher, splits = T.load_teacher(cfg), _splits()
    feats = T.features(teacher, {"val": splits["val"]}, cfg, progress=False)
    with torch.no_grad():
        want = teacher.backbone(teacher.prep(splits["val"].images))
    torch.testing.assert_close(feats["val"], want, rtol=1e-5, atol=1e-5)


def test_cache_key_changes_with_teacher_weights(tiny_teacher_dir):
    cfg = _cfg(tiny_teacher_dir)
    splits = _splits()
    a = T.load_teacher(cfg)
    fa = T.features(a, splits, cfg, progress=False)
    b = T.load_teacher(cfg)
    with torch.no_grad():
        next(b.backbone.parameters()).add_(0.5)
    b = T.Teacher(b.backbone, b.prep, b.source, T.state_dict_sha256(b.backbone))
    assert b.sha256 != a.sha256
    fb = T.features(b, splits, cfg, progress=False)
    assert len(list(T.cache_dir().glob("features-*.safetensors"))) == 2
    assert not torch.equal(fa["train"], fb["train"])


def test_cache_key_changes_with_pooling_and_input_size(tiny_teacher_dir):
    splits = _splits()
    # A teacher now sees its own resolution unless teacher.input_size sets one (data.input_size is only the
    # student's), so the other input size is set there.
    for cfg in (_cfg(tiny_teacher_dir), _cfg(tiny_teacher_dir, "teacher.input_size=56")):
        T.features(T.load_teacher(cfg), splits, cfg, progress=False)
    cfg = _cfg(tiny_teacher_dir, "teacher.pooling=cls")
    f = T.features(T.load_teacher(cfg), splits, cfg, progress=False)
    assert f["train"].shape[1] == 32
    assert len(list(T.cache_dir().glob("features-*.safetensors"))) == 3


def test_cache_does_not_serve_features_of_other_images(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir)
    teacher = T.load_teacher(cfg)
    T.features(teacher, _splits(), cfg, progress=False)
    write_medmnist_npz(tmp_path / "breastmnist.npz", "breastmnist", seed=99)  # same sizes, other images
    other = _splits(root=tmp_path)
    cfg_other = _cfg(tiny_teacher_dir, root=str(tmp_path))
    got = T.features(teacher, other, cfg_other, progress=False)
    with torch.no_grad():
        want = teacher.backbone(teacher.prep(other["val"].images))
    torch.testing.assert_close(got["val"], want, rtol=1e-5, atol=1e-5)


def test_teacher_logits_cached_and_keyed_on_head(tiny_teacher_dir, monkeypatch):
    cfg = _cfg(tiny_teacher_dir)
    teacher, splits = T.load_teacher(cfg), _splits()
    feats = T.features(teacher, splits, cfg, progress=False)
    torch.manual_seed(0)
    head = nn.Linear(64, 1)
    first = T.teacher_logits(teacher, head, feats, cfg)
    with torch.no_grad():
        torch.testing.assert_close(first["test"], head(feats["test"]))
    called = []
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: called.append(1) or torch.zeros(len(x), 1))
    second = T.teacher_logits(teacher, head, feats, cfg)
    assert not called
    for s in SPLITS:
        assert torch.equal(first[s], second[s])
    with torch.no_grad():
        head.bias.add_(1.0)
    T.teacher_logits(teacher, head, feats, cfg)
    assert called  # another head: another key, recomputed
    assert len(list(T.cache_dir().glob("logits-*.safetensors"))) == 2


def test_cache_lives_in_zoo_home_and_no_temp_files_remain(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir)
    T.features(T.load_teacher(cfg), _splits(), cfg, progress=False)
    assert T.cache_dir() == tmp_path / "zoo_home" / ".cache" / "teacher"
    assert not list(T.cache_dir().glob("*.tmp"))


def test_cache_with_wrong_lengths_is_recomputed(tiny_teacher_dir):
    cfg = _cfg(tiny_teacher_dir)
    teacher, splits = T.load_teacher(cfg), _splits()
    T.features(teacher, {"val": splits["val"]}, cfg, progress=False)
    feats = T.features(teacher, splits, cfg, progress=False)  # the cached file lacks train/test
    assert set(feats) == set(SPLITS) and feats["train"].shape[0] == len(splits["train"])


def test_train_probe(tiny_teacher_dir):
    cfg = _cfg(tiny_teacher_dir, "probe.epochs=3")
    teacher, splits = T.load_teacher(cfg), _splits()
    feats = T.features(teacher, splits, cfg, progress=False)
    probe = T.train_probe(feats, splits, "binary-class", 1, cfg, torch.Generator().manual_seed(0), progress=False)
    head, res = probe.head, probe.fit
    assert isinstance(head, nn.Linear) and head.weight.shape == (1, 64)
    assert len(res.history) == 3 and 1 <= res.best_epoch <= 3


def test_teacher_from_built_linear_entry(built_linear_breast, tiny_teacher_dir):
    install(built_linear_breast)
    cfg = _cfg("linear-dinov2-vits14-breastmnist")
    t = T.load_teacher(cfg)
    assert t.head is not None and t.source == "linear-dinov2-vits14-breastmnist"
    # The registered linear entry pins its teacher's resolution: 224 px (DINOv2's), whatever teacher.backbone
    # copy it was built from (it was 28, the data's size, before entries pinned teacher.input_size).
    assert t.prep.in_chans == 3 and t.prep.input_size == 224
    with pytest.raises(ValueError, match="trained on breastmnist, not chestmnist"):
        T.load_teacher(_cfg("linear-dinov2-vits14-breastmnist", dataset="chestmnist"))


def test_teacher_must_be_a_linear_entry(built_resnet18_breast):
    install(built_resnet18_breast)
    # The message names every kind of entry that can teach (fine-tuned teachers joined in issue 13).
    with pytest.raises(ValueError, match="a teacher must be a linear-\\*, finetune-\\* or dinomx-\\* entry"):
        T.load_teacher(_cfg("baseline-resnet18-breastmnist"))
