"""Light augmentation for the supervised recipes: random crops with padding and flips where the anatomy allows.

MedAlmighty (and MedMNIST v2) train without augmentation; at 28 px a ResNet then overfits within a
few epochs. ``train.augment: light`` adds what CIFAR-style training uses at this size: each image is
padded by ``train.crop_padding`` pixels (reflection) and cropped back to its size at a random
offset, and mirrored where a mirror image is still a plausible image of that body part:

- ``both`` (horizontal and vertical): microscopy and fundus images, which have no orientation
  (blood cells, pathology, dermatoscopy, retina, tissue);
- ``horizontal``: ultrasound and OCT B-scans (left and right are symmetric for the task);
- ``none``: chest X-rays and abdominal CT slices, where left and right are anatomy (the heart, the
  liver) and a mirrored image is not one a model will meet.

Augmentation draws from its own generator, seeded by the run's seed, so the batch order (and so a
run without augmentation) is the same with or without it. Teachers' cached logits are computed on
the unaugmented images; with shifts of a few pixels and mirror images they remain the teacher's
answer for the same content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLIPS = ("none", "horizontal", "both")
# dataset flag -> the flips that keep its images plausible (see the module doc)
DATASET_FLIPS: dict[str, str] = {
    "bloodmnist": "both", "pathmnist": "both", "dermamnist": "both", "retinamnist": "both", "tissuemnist": "both",
    "breastmnist": "horizontal", "octmnist": "horizontal",
    "chestmnist": "none", "pneumoniamnist": "none",
    "organamnist": "none", "organcmnist": "none", "organsmnist": "none",
}


@dataclass(frozen=True)
class Augment:
    """Random crop after reflection padding by ``padding`` pixels, then the ``flips`` allowed."""

    padding: int
    flips: str

    def __post_init__(self) -> None:
        if self.flips not in FLIPS:
            raise ValueError(f"flips must be one of {', '.join(FLIPS)}, got {self.flips!r}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) uint8 or float -> the same shape and dtype, augmented image by image."""
        b, _, h, w = images.shape
        x = images
        if self.padding:
            p = self.padding
            padded = F.pad(x.float(), (p, p, p, p), mode="reflect").to(x.dtype)
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g)
            rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
            cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
            x = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
        if self.flips in ("horizontal", "both"):
            m = (torch.rand(b, generator=g) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(m, x.flip(-1), x)
        if self.flips == "both":
            m = (torch.rand(b, generator=g) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(m, x.flip(-2), x)
        return x.contiguous()


def augment_for(kind: str, dataset: str, flip: str = "auto", padding: int = 4) -> Augment | None:
    """The augmentation of ``train.augment`` (``none`` or ``light``) for ``dataset``; ``flip: auto`` reads
    :data:`DATASET_FLIPS`."""
    if kind == "none":
        return None
    if kind != "light":
        raise ValueError(f"train.augment must be none or light, got {kind!r}")
    flips = DATASET_FLIPS.get(dataset, "none") if flip == "auto" else flip
    return Augment(padding, flips)
