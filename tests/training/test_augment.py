"""Light augmentation: crops of the padded image, flips only where the dataset allows, its own random stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.augment import DATASET_FLIPS, Augment, augment_for
from zoo.data import datasets_2d


def test_every_dataset_has_a_flip_policy():
    assert set(DATASET_FLIPS) == set(datasets_2d())
    assert augment_for("light", "organamnist").flips == "none" and augment_for("light", "bloodmnist").flips == "both"
    assert augment_for("none", "bloodmnist") is None
    with pytest.raises(ValueError, match="none or light"):
        augment_for("heavy", "bloodmnist")


def test_crops_are_windows_of_the_reflection_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 28, 28), dtype=torch.uint8)
    out = Augment(4, "none")(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for i in range(len(x)):  # each output is one 28 x 28 window of its padded image
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(padded[i, :, dy:dy + 28, dx:dx + 28], out[i])]
        assert hits, i
    assert not torch.equal(out, x)  # some offset other than the centre was drawn


def test_flips_and_determinism():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4).repeat(32, 1, 1, 1)
    a = Augment(0, "horizontal")(x, torch.Generator().manual_seed(1))
    b = Augment(0, "horizontal")(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(a[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert not any(torch.equal(a[i], x[i].flip(-2)) and not torch.equal(x[i], x[i].flip(-2)) for i in range(len(x)))
    both = Augment(0, "both")(x, torch.Generator().manual_seed(2))
    assert any(torch.equal(both[i], x[i].flip(-2)) for i in range(len(x)))
