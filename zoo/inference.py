"""Turning user images into model input, and logits into task-aware probabilities.

Training-time evaluation and ``ZooModel.predict`` share :func:`predict_probs`, so a model card's
test figures are reproduced exactly by ``predict`` on the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from zoo.data import Preprocess, preprocess
from zoo.tasks import get_task

EVAL_BATCH_SIZE = 256

_FORMS = (
    "PIL images, numpy arrays (H,W), (H,W,C), (N,H,W) or (N,H,W,C) [uint8 0-255 or float 0-1], "
    "or torch tensors (C,H,W) or (N,C,H,W)"
)


def logits_to_probs(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits (N, K) -> probabilities (N, C) in medmnist's score layout.

    Binary models have one logit (BCE); their probabilities are ``[1 - p, p]`` so column 1 is the
    positive class, as medmnist's evaluator reads it. Multi-label: one sigmoid per label.
    """
    return get_task(task).probs(logits)


@torch.no_grad()
def predict_logits(
    net: nn.Module, images: torch.Tensor, prep: Preprocess | None, batch_size: int = EVAL_BATCH_SIZE,
    desc: str | None = None,
) -> torch.Tensor:
    """Raw images (N, C, H, W) uint8 or float [0, 1] -> outputs (N, K), in fixed-size chunks, fp32.

    ``prep=None`` feeds ``images`` as they are (cached feature tensors); ``desc`` shows a progress bar.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = []
    starts = range(0, images.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, leave=False, unit="batch") if desc else starts:
        x = images[i : i + batch_size]
        x = preprocess(x, prep) if prep is not None else x.float()
        out.append(net(x.to(device)).float().cpu())
    net.train(was_training)
    if not out:
        raise ValueError("no images to predict")
    return torch.cat(out)


def _one_image(img, in_chans: int) -> torch.Tensor:
    """A single image in any accepted form -> (C, H, W) tensor (uint8, or float in [0, 1])."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(img, Image.Image):
        img = np.array(img.convert("L" if in_chans == 1 else "RGB"))
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3:
            raise ValueError(f"predict: cannot read an array of shape {img.shape} as an image; expected {_FORMS}")
        return _from_numpy(img).permute(2, 0, 1).contiguous()
    if isinstance(img, torch.Tensor):
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3:
            raise ValueError(
                f"predict: cannot read a tensor of shape {tuple(img.shape)} as an image; expected {_FORMS}"
            )
        return _check_tensor(img)
    raise TypeError(f"predict: cannot read {type(img).__name__} as an image; expected {_FORMS}")


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        return _check_tensor(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
    raise ValueError(f"predict: image arrays must be uint8 (0-255) or float (0-1), got dtype {a.dtype}")


def _check_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise ValueError(f"predict: image tensors must be uint8 or float in [0, 1], got {t.dtype}")
    if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
        raise ValueError(
            "predict: float images must hold values in [0, 1] (unnormalised); "
            f"got range [{float(t.min()):.3g}, {float(t.max()):.3g}]. Pass uint8 0-255 or divide by 255"
        )
    return t.float()


def to_batch(images, in_chans: int) -> list[torch.Tensor]:
    """Any accepted input -> a list of (N_i, C, H, W) tensors (one per distinct image size)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        # contiguous: the same memory layout as the npz-loaded tensors, so results match bit for bit
        items = [_from_numpy(images).permute(0, 3, 1, 2).contiguous()]
    elif isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (1, 3, 4):
        items = [_from_numpy(images)[:, None]]  # (N, H, W) grey batch, as MedMNIST stores it
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        items = [_check_tensor(images)]
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("predict: got an empty list of images")
        items = [_one_image(im, in_chans)[None] for im in images]
    else:
        items = [_one_image(images, in_chans)[None]]
    for t in items:
        if 0 in t.shape:
            raise ValueError(f"predict: got an empty image batch of shape {tuple(t.shape)}")
        if t.shape[1] not in (1, in_chans):
            raise ValueError(
                f"predict: this model takes {in_chans}-channel images (or greyscale), got {t.shape[1]} channels; "
                f"convert the images to {'greyscale' if in_chans == 1 else 'RGB'} first"
            )
    # Stack runs of same-shaped single images so they go through the model as one batch.
    groups: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for t in items:
        if run and (t.shape[1:] != run[-1].shape[1:] or t.dtype != run[-1].dtype):
            groups.append(torch.cat(run))
            run = []
        run.append(t)
    groups.append(torch.cat(run))
    return groups


@dataclass
class Prediction:
    """What ``ZooModel.predict`` returns.

    Attributes:
        probs: (N, C) probabilities; binary tasks give ``[1 - p, p]``, multi-label one sigmoid per label.
        labels: N label names: argmax for multi-class/ordinal, ``p > 0.5`` for binary, and for
            multi-label the most probable label (see ``label_sets`` for all labels above threshold).
        label_sets: N lists of label names: every label with ``p > 0.5`` for multi-label tasks,
            ``[labels[i]]`` otherwise.
        indices: N class indices matching ``labels``.
        task: the entry's task.
    """

    probs: np.ndarray
    labels: list[str]
    label_sets: list[list[str]]
    indices: np.ndarray
    task: str

    def __len__(self) -> int:
        return len(self.labels)


def make_prediction(probs: torch.Tensor, task: str, names: Sequence[str]) -> Prediction:
    p = probs.numpy().astype(np.float32)
    t = get_task(task)
    idx = t.decide(p)
    labels = [names[i] for i in idx]
    if t.multilabel:
        sets = [[names[j] for j in np.flatnonzero(row)] for row in t.positives(p)]
    else:
        sets = [[lab] for lab in labels]
    return Prediction(probs=p, labels=labels, label_sets=sets, indices=idx, task=task)
