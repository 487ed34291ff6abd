"""Students (timm CNNs with MedMNIST's small stem) and transformers teachers behind one contract."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from zoo.models import (
    HFBackbone,
    LinearClassifier,
    backbone_normalisation,
    create_student,
    state_dict_sha256,
)
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD


def _record_stem(net: nn.Module) -> dict:
    seen = {}

    def hook(module, inputs, output):
        seen["stem"] = output.shape

    net.maxpool.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("arch", ["resnet-test", "resnet18", "resnet50", "seresnet50", "skresnet50"])
def test_student_logits_and_small_stem(arch, in_chans):
    torch.manual_seed(0)
    net = create_student(arch, num_outputs=5, in_chans=in_chans).eval()
    assert isinstance(net.maxpool, nn.Identity)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.in_channels == in_chans
    seen = _record_stem(net)
    with torch.no_grad():
        out = net(torch.randn(2, in_chans, 28, 28))
    assert out.shape == (2, 5)
    assert seen["stem"][-2:] == (28, 28)  # the stem keeps 28 x 28


def test_default_stem_downsamples_by_four():
    net = create_student("resnet-test", 1, 3, small_stem=False).eval()
    seen = _record_stem(net)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 56, 56)).shape == (1, 1)
    assert seen["stem"][-2:] == (14, 14)


def test_unknown_student_arch():
    with pytest.raises(ValueError, match="unknown student arch 'vgg16'.*resnet-test"):
        create_student("vgg16", 2)


def test_student_init_is_seeded():
    torch.manual_seed(3)
    a = create_student("resnet-test", 2, 1)
    torch.manual_seed(3)
    b = create_student("resnet-test", 2, 1)
    assert state_dict_sha256(a) == state_dict_sha256(b)


# --- transformers backbones ------------------------------------------------------------------------


@pytest.mark.parametrize("pooling,dim", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_hf_backbone_pooling(tiny_teacher_dir, pooling, dim):
    bb = HFBackbone.from_pretrained(tiny_teacher_dir, pooling=pooling)
    assert bb.embed_dim == dim and bb.num_register_tokens == 0 and bb.in_chans == 3
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        tokens = bb.model(pixel_values=x).last_hidden_state
        out = bb(x)
    assert tokens.shape == (3, 1 + 16, 32)  # CLS + (28 / 7)^2 patches
    want = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1),
            "cls+mean": torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)}[pooling]
    assert out.shape == (3, dim)
    torch.testing.assert_close(out, want)


def test_hf_backbone_skips_register_tokens(tiny_registers_teacher_dir):
    bb = HFBackbone.from_pretrained(tiny_registers_teacher_dir, pooling="cls+mean")
    assert bb.num_register_tokens == 2
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        tokens = bb.forward_features(x)
        out = bb(x)
    assert tokens.shape == (2, 1 + 2 + 16, 32)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], -1))
    # including the registers would give a different embedding: the test can tell them apart
    assert not torch.allclose(out[:, 32:], tokens[:, 1:].mean(1))


def test_hf_backbone_bad_pooling(tiny_teacher_dir):
    with pytest.raises(ValueError, match="pooling must be"):
        HFBackbone.from_pretrained(tiny_teacher_dir, pooling="max")


def test_hf_backbone_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFBackbone.from_pretrained(tmp_path)


def test_hf_backbone_missing_source_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="cannot load teacher backbone .*teacher.backbone=/path/to/model"):
        HFBackbone.from_pretrained(tmp_path / "nope")


def test_backbone_normalisation(tiny_teacher_dir, tmp_path):
    assert backbone_normalisation(tiny_teacher_dir) == (IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1] * 3, "image_std": [0.2] * 3}))
    assert backbone_normalisation(tmp_path) == ((0.1,) * 3, (0.2,) * 3)


def test_linear_classifier_contract(tiny_teacher_dir):
    net = LinearClassifier(HFBackbone.from_pretrained(tiny_teacher_dir), num_outputs=4)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 64 * 4 + 4
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (2, 4)
        torch.testing.assert_close(net.forward_head(net.forward_features(x)), logits)
        torch.testing.assert_close(net.head(net.embed(x)), logits)


def test_state_dict_sha256_tracks_weights():
    torch.manual_seed(0)
    net = create_student("resnet-test", 2, 1)
    h = state_dict_sha256(net)
    assert h == state_dict_sha256(copy.deepcopy(net))
    with torch.no_grad():
        net.fc.bias[0] += 1e-6
    assert state_dict_sha256(net) != h
    # buffers count too (BatchNorm running statistics)
    other = copy.deepcopy(net)
    h2 = state_dict_sha256(other)
    other.bn1.running_mean[0] += 1
    assert state_dict_sha256(other) != h2
