"""MedMNIST v2 (2D) data: metadata from ``medmnist.INFO`` (:mod:`zoo.datasets`), splits held in memory as uint8 tensors.

Files are read from a root folder: ``$MEDMNIST_ROOT`` when set, else medmnist's default root
(``~/.medmnist``). ``<flag>.npz`` holds 28 px images, ``<flag>_<size>.npz`` the MedMNIST+ sizes
64/128/224. A missing file is downloaded with medmnist when allowed and possible; offline, the error
names the path and where to get the file.

Images stay uint8 (N, C, H, W) in memory; :func:`preprocess` turns a batch into model input
(resize, channel replication, normalisation) on the fly, for training, evaluation and ``predict``
alike, so there is one definition of preprocessing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The torch-free metadata lives in zoo.datasets (so listing the zoo does not import torch); re-exported here.
from zoo.datasets import (  # noqa: F401
    SIZES,
    SPLITS,
    DatasetInfo,
    dataset_info,
    datasets_2d,
    medmnist_info,
    medmnist_root,
    npz_path,
)


class DatasetNotFoundError(FileNotFoundError):
    """A MedMNIST file is missing and could not be downloaded."""


def _download(flag: str, size: int, path: Path) -> None:
    """medmnist's own download (Zenodo, MD5-checked) into the folder that ``path`` is in."""
    import medmnist

    path.parent.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, medmnist_info()[flag]["python_class"])
    dataset_class(split="test", root=str(path.parent), download=True, size=size)


def ensure_file(flag: str, size: int = 28, root=None, download: bool = True) -> Path:
    info = dataset_info(flag)
    path = npz_path(flag, size, root)
    if path.is_file():
        return path
    reason = "download disabled (data.download=false)"
    if download:
        try:
            _download(flag, size, path)
            if path.is_file():
                return path
        except Exception as e:  # offline, proxy, checksum: all end in the same advice
            cause = e.__cause__ or e.__context__ or e  # medmnist re-raises a generic RuntimeError
            first = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")
            reason = f"download failed: {type(cause).__name__}: {first}"
    raise DatasetNotFoundError(
        f"MedMNIST file not found: {path} ({reason}). Download {info.url(size)} to that path, "
        f"or set MEDMNIST_ROOT to the folder that holds {path.name}."
    )


@dataclass(frozen=True)
class Split:
    """One split in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N, L)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@functools.lru_cache(maxsize=8)
def _load_npz(path: str, mtime: float) -> dict[str, Split]:
    try:
        npz = np.load(path)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a MedMNIST npz file ({e}); delete it and download it again") from None
    splits = {}
    for split in SPLITS:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}: not a MedMNIST 2D npz file")
        imgs, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4):
            raise ValueError(
                f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,C), got {imgs.dtype} {imgs.shape}"
            )
        t = torch.from_numpy(np.ascontiguousarray(imgs))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
        lab = torch.from_numpy(labels.astype(np.int64).reshape(len(labels), -1))
        splits[split] = Split(images=t, labels=lab)
    return splits


def load_split(flag: str, split: str, size: int = 28, root=None, download: bool = True) -> Split:
    """Load one split of a MedMNIST dataset into memory (cached per file)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = dataset_info(flag)
    path = ensure_file(flag, size, root, download)
    data = _load_npz(str(path), path.stat().st_mtime)[split]
    if data.images.shape[1] != info.n_channels:
        raise ValueError(
            f"{path}: {split} images have {data.images.shape[1]} channels but {flag} has {info.n_channels}"
        )
    return data


@dataclass(frozen=True)
class Preprocess:
    """Model-input preprocessing, read from a zoo entry: size, channels, per-channel mean/std, resize.

    The one normalisation helper: a mean/std given once for all channels is expanded here to one
    value per channel, so every consumer (training, ``predict``, export, serving) reads per-channel
    values and nothing else re-derives them.
    """

    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in per_channel(self.mean, self.in_chans)))
        object.__setattr__(self, "std", tuple(float(v) for v in per_channel(self.std, self.in_chans)))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, self)

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "in_chans": self.in_chans, "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize}

    def timm_data_config(self) -> dict[str, Any]:
        """This preprocessing in timm's words (the keys ``timm.data.resolve_data_config`` reads).

        ``crop_pct`` 1.0: the whole image is resized to the input size, never cropped, as :func:`preprocess` does.
        """
        return {"input_size": (self.in_chans, self.input_size, self.input_size), "interpolation": self.resize,
                "mean": self.mean, "std": self.std, "crop_pct": 1.0, "crop_mode": "center"}

    def hf_processor_config(self) -> dict[str, Any]:
        """This preprocessing as a transformers ``preprocessor_config.json`` (``BitImageProcessor``).

        Resize to a square of the input size with the entry's resampling, no crop, rescale to [0, 1], normalise.
        RGB conversion only for 3-channel models: a 1-channel model must keep a grey image grey (transformers'
        pipelines convert every image to RGB first, so they need the 3-channel folder of
        :func:`zoo.backbones.fold_grey_patch_embedding`).
        """
        return {"image_processor_type": "BitImageProcessor", "do_resize": True,
                "size": {"height": self.input_size, "width": self.input_size},
                "resample": PIL_RESAMPLE[self.resize], "do_center_crop": False, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "do_convert_rgb": self.in_chans == 3}


RESIZE_MODES = ("bilinear", "nearest")
# Each resize mode as a PIL resampling filter (what transformers' image processors take); timm's names are ours.
PIL_RESAMPLE = {"bilinear": 2, "nearest": 0}  # PIL.Image.Resampling.BILINEAR, .NEAREST
# ITU-R 601-2 luma, as Pillow's RGB -> "L" conversion (16-bit fixed point, rounded), the one RGB -> grey rule.
_LUMA = (19595, 38470, 7471)
LUMA_WEIGHTS = tuple(v / 65536 for v in _LUMA)  # the same weights as floats (they sum to 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) -> grey (N, 1, H, W) by ITU-R 601-2 luma, the formula of Pillow's ``convert("L")``.

    uint8 input gives uint8, bit-identical to Pillow; float input gives the unrounded float luma.
    """
    if x.shape[1] != 3:
        raise ValueError(f"luma takes RGB images (N, 3, H, W), got {x.shape[1]} channels")
    if x.dtype == torch.uint8:
        r, g, b = (x[:, i:i + 1].to(torch.int32) for i in range(3))
        return ((r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16).to(torch.uint8)
    w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def to_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """The one channel policy: grey is replicated to ``c`` channels, RGB becomes grey by :func:`luma`.

    Used where the conversion is asked for (a grey backbone pooled with RGB datasets); model input
    (:func:`preprocess`) only ever replicates grey, since silently dropping colour would change what
    the model sees.
    """
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, c, -1, -1).contiguous()
    if c == 1 and x.shape[1] == 3:
        return luma(x)
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to {c} channels")


def preprocess(images: torch.Tensor, p: Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) or float in [0, 1] -> normalised float (N, in_chans, S, S).

    Grey images are replicated to 3 channels only when the model takes 3; any other channel
    mismatch is an error, as silently averaging colour away would change what the model sees.
    """
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    c = x.shape[1]
    if c != p.in_chans:
        if c == 1:
            x = x.expand(-1, p.in_chans, -1, -1)
        else:
            raise ValueError(
                f"model expects {p.in_chans}-channel images, got {c} channels; "
                f"convert the images to {'greyscale' if p.in_chans == 1 else 'RGB'} first"
            )
    if x.shape[-2:] != (p.input_size, p.input_size):
        mode = p.resize
        kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(p.input_size, p.input_size), mode=mode, **kw)
    mean = torch.tensor(p.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(p.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def per_channel(v: Sequence[float], c: int) -> list[float]:
    """A mean/std given once for all channels, or once per channel, as ``c`` values."""
    v = list(v)
    if len(v) == c:
        return v
    if len(v) == 1:
        return v * c
    raise ValueError(f"mean/std has {len(v)} values for {c} channels")


def fingerprint(splits: dict[str, Split]) -> str:
    """A content hash of in-memory splits: caches keyed on it never serve results of other images."""
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        h.update(f"{name}:{tuple(s.images.shape)}:{tuple(s.labels.shape)}".encode())
        h.update(s.images.contiguous().numpy().tobytes())
        h.update(s.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def iterate_batches(
    n: int, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
):
    """Index batches over ``range(n)``; in-memory data needs no DataLoader workers."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
