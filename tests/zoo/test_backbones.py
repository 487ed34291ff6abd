"""The one ViT backbone wrapper: pooling, register tokens, errors, the backbone's own normalisation."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.backbones import ViTBackbone, backbone_normalisation
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD

# --- transformers backbones ------------------------------------------------------------------------


@pytest.mark.parametrize("pooling,dim", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_hf_backbone_pooling(tiny_teacher_dir, pooling, dim):
    bb = ViTBackbone.from_pretrained(tiny_teacher_dir, pooling=pooling)
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
    bb = ViTBackbone.from_pretrained(tiny_registers_teacher_dir, pooling="cls+mean")
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
        ViTBackbone.from_pretrained(tiny_teacher_dir, pooling="max")


def test_hf_backbone_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ViTBackbone.from_pretrained(tmp_path)


def test_hf_backbone_missing_source_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="cannot load teacher backbone .*teacher.backbone=/path/to/model"):
        ViTBackbone.from_pretrained(tmp_path / "nope")


def test_backbone_normalisation(tiny_teacher_dir, tmp_path):
    assert backbone_normalisation(tiny_teacher_dir) == (IMAGENET_MEAN, IMAGENET_STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1] * 3, "image_std": [0.2] * 3}))
    assert backbone_normalisation(tmp_path) == ((0.1,) * 3, (0.2,) * 3)
