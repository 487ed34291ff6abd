"""The zoo's students in timm's own terms: a ``pretrained_cfg`` per entry and the small-stem architectures.

Every loaded student carries the ``pretrained_cfg`` (and its alias ``default_cfg``) of its entry, so
timm's data helpers preprocess as the zoo does::

    net = zoo.load("baseline-resnet18-breastmnist").net
    cfg = timm.data.resolve_data_config(model=net)      # 1x28x28, mean/std 0.5, bilinear, crop_pct 1.0
    transform = timm.data.create_transform(**cfg)

The 28 px students (3x3 stride-1 stem, no max-pool) are timm architectures ``medmnist_<arch>`` once
`zoo.register_timm_models()` has run (explicitly: importing the zoo registers nothing). An entry's weights then
load with timm alone; :func:`zoo.loading.timm_kwargs` gives the arguments::

    zoo.register_timm_models()
    net = timm.create_model(**zoo.timm_kwargs("baseline-resnet18-breastmnist"))
    # = timm.create_model("medmnist_resnet18", pretrained=True,
    #                     pretrained_cfg_overlay=dict(file=".../model.safetensors", input_size=(1, 28, 28), ...))

The entry is the only source of the values (:meth:`zoo.data.Preprocess.timm_data_config`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch.nn as nn

from zoo.models import create_student
from zoo.registry import MEDMNIST_MEAN, MEDMNIST_STD, STUDENT_ARCHS, ZooEntry

PREFIX = "medmnist_"  # timm name of a small-stem student: medmnist_resnet18, ...
HUB_PREFIX = "hf-hub:"  # zoo.hub.PREFIX; timm reads ``org/repo[@revision]`` the same way the zoo does

# timm's defaults for the registered architectures (register_model reads this module's ``default_cfgs``):
# MedMNIST's 28 px grey input; no weights of their own (an entry's file is given as an overlay).
default_cfgs: dict[str, dict[str, Any]] = {
    PREFIX + arch: dict(input_size=(3, 28, 28), mean=MEDMNIST_MEAN * 3, std=MEDMNIST_STD * 3, interpolation="bilinear",
                        crop_pct=1.0, crop_mode="center", num_classes=1000, first_conv="conv1", classifier="fc")
    for arch in STUDENT_ARCHS
}


def timm_arch(entry: ZooEntry) -> str | None:
    """The timm architecture of a student entry: ``medmnist_<arch>`` (small stem) or timm's own; None for tests."""
    if entry.arch not in STUDENT_ARCHS:
        return None
    return PREFIX + entry.arch if entry.small_stem else entry.arch


def pretrained_cfg(entry: ZooEntry) -> dict[str, Any]:
    """The timm ``pretrained_cfg`` of a student entry: its preprocessing, outputs, labels, licence and hub repo.

    ``num_classes`` is the classifier's width (1 for binary tasks, whose two ``label_names`` are read from the
    sign of the one logit).
    """
    cfg: dict[str, Any] = {"architecture": timm_arch(entry), "tag": entry.name,
                           **entry.preprocess.timm_data_config(), "num_classes": entry.num_outputs,
                           "label_names": entry.labels, "first_conv": "conv1", "classifier": "fc"}
    if entry.license:
        cfg["license"] = entry.license
    if entry.weights and entry.weights.startswith(HUB_PREFIX):
        cfg["hf_hub_id"] = entry.weights.removeprefix(HUB_PREFIX)
    return cfg


def set_pretrained_cfg(net: nn.Module, entry: ZooEntry) -> nn.Module:
    """Attach the entry's ``pretrained_cfg`` (and ``default_cfg``) to a student, and to each ensemble member."""
    cfg = pretrained_cfg(entry)
    for m in (net, *getattr(net, "members", ())):
        m.pretrained_cfg = dict(cfg)
        m.default_cfg = m.pretrained_cfg  # timm's alias, kept for older callers
    return net


def _build(arch: str, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict[str, Any] | None = None, num_classes: int | None = None,
           in_chans: int | None = None, **kwargs: Any) -> nn.Module:
    """A small-stem student as timm builds models: channels and classes default to the resolved cfg's."""
    from timm.models._builder import resolve_pretrained_cfg

    kwargs.pop("cache_dir", None)
    if kwargs:
        raise TypeError(f"{PREFIX}{arch} takes num_classes and in_chans only, got {sorted(kwargs)}")
    cfg = resolve_pretrained_cfg(PREFIX + arch, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    in_chans = in_chans if in_chans is not None else int(cfg["input_size"][0])
    num_classes = num_classes if num_classes is not None else int(cfg["num_classes"])
    net = create_student(arch, num_classes, in_chans, small_stem=True)
    net.pretrained_cfg = cfg
    net.default_cfg = net.pretrained_cfg
    if pretrained:
        net.load_state_dict(_weights(cfg, PREFIX + arch), strict=True)  # strict: a mismatch is an error, not a drop
    return net


def _weights(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    if cfg.get("file"):
        return load_file(str(Path(cfg["file"]).expanduser()))
    if cfg.get("hf_hub_id"):
        from timm.models._hub import load_state_dict_from_hf

        return load_state_dict_from_hf(cfg["hf_hub_id"])
    raise ValueError(f"{name} has no weights of its own: pass pretrained_cfg_overlay=dict(file=<entry>/"
                     "model.safetensors, ...), e.g. timm.create_model(**zoo.timm_kwargs(<zoo name>))")


def _entrypoint(arch: str):
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _build(arch, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = PREFIX + arch  # register_model names the model after the function
    fn.__module__ = __name__
    fn.__doc__ = f"timm's {arch} with MedMNIST's 28 px stem (3x3 stride-1 conv1, no max-pool)."
    return fn


def register_timm_models() -> list[str]:
    """Register ``medmnist_<arch>`` for every student arch with timm (idempotent); returns the names."""
    from timm.models import is_model, register_model

    names = [PREFIX + arch for arch in STUDENT_ARCHS]
    for arch, name in zip(STUDENT_ARCHS, names):
        if not is_model(name):
            setattr(sys.modules[__name__], name, register_model(_entrypoint(arch)))
    return names


__all__ = ["PREFIX", "pretrained_cfg", "register_timm_models", "set_pretrained_cfg", "timm_arch"]
