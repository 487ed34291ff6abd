"""Students (timm CNNs with MedMNIST's small stem) and transformers teachers behind one contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from zoo.backbones import ViTBackbone
from zoo.models import LinearClassifier, create_student, embed, state_dict_sha256


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


def test_linear_classifier_contract(tiny_teacher_dir):
    net = LinearClassifier(ViTBackbone.from_pretrained(tiny_teacher_dir), num_outputs=4)
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


def test_students_answer_the_same_contract_as_probes():
    torch.manual_seed(0)
    net = create_student("resnet-test", 3, 1).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        feats = net.forward_features(x)
        e = embed(net, x)
        assert feats.shape[:2] == (2, 64) and e.shape == (2, 64)
        torch.testing.assert_close(net.get_classifier()(e), net(x))
        torch.testing.assert_close(net.forward_head(feats), net(x))
