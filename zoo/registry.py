"""The zoo registry: one frozen dataclass per named model, ``<method>-<arch>-<dataset>[.<tag>]``.

A name fixes everything a user's images go through and where the model's knowledge came from, as
timm's pretrained tags do (``resnet50.a1_in1k`` and ``resnet50.tv_in1k`` are two weight sets of one
architecture): input size, channels, per-channel mean/std, resize, label set, and the teacher with
its resolution. A variant that changes any of them is another name, ``<base>.<tag>``::

    medalmighty-resnet18-bloodmnist              student 28 px; teacher DINOv2 ViT-B/14 at 224 px (the paper's)
    medalmighty-resnet18-bloodmnist.dinomx-28    student 28 px; teacher DINO-MX vit-mini-p4 + linear at 28 px
    baseline-resnet50-pathmnist.224              28 px images upsampled (nearest) to 224, standard stem

The training config is derived from the entry (:meth:`ZooEntry.pins`), never the other way round:
an override that contradicts a pin is refused with the name of the variant to build instead.

Entries are declared explicitly in :func:`_declare` (no import side effects, no ``__dict__``
lookups): a general builder per kind that takes every field, and tables of variants that only pin
values. Export, serving and benchmarks read preprocessing and labels from the entry only.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zoo.datasets import DatasetInfo, dataset_info, datasets_2d

if TYPE_CHECKING:
    from zoo.data import Preprocess

# Student CNNs (timm names): the paper's ResNet50 / SENet50 / SKNet50, plus MedMNIST's ResNet-18.
STUDENT_ARCHS = ("resnet18", "resnet50", "seresnet50", "skresnet50")
# A tiny ResNet (one BasicBlock per stage, 8-64 channels) for tests and smoke runs; not in the zoo.
TEST_ARCHS = ("resnet-test",)
# Teacher backbones by short name -> default hub id (DINOv2 ViT-S/B/L with patch 14).
TEACHER_BACKBONES = {
    "dinov2-vits14": "facebook/dinov2-small",
    "dinov2-vitb14": "facebook/dinov2-base",
    "dinov2-vitl14": "facebook/dinov2-large",
}
# DINO-MX backbones pretrained here (random init, no download): small enough for a CPU at 28 px.
DINOMX_BACKBONES = ("vit-mini-p4",)
METHODS = ("baseline", "medalmighty", "linear", "finetune", "dinomx", "ensemble", "camkd")
# Classifiers made of a ViT backbone and a linear head: frozen (linear probe) or trained end to end.
PROBE_METHODS = ("linear", "finetune")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEDMNIST_MEAN = (0.5,)
MEDMNIST_STD = (0.5,)
# The paper's teachers see the image at their own resolution (DINOv2's 224), whatever the student's.
HUB_TEACHER_SIZE = 224


@dataclass(frozen=True)
class ZooEntry:
    """Everything needed to build, load, preprocess for and describe one zoo model.

    Attributes:
        name: ``<method>-<arch>-<dataset>``, plus ``.<tag>`` for a variant.
        method: ``baseline`` (student alone), ``medalmighty`` (distilled student), ``linear``
            (frozen ViT teacher + linear head), ``dinomx`` (a self-supervised ViT backbone, no head).
        arch: a student in :data:`STUDENT_ARCHS` or a teacher in :data:`TEACHER_BACKBONES`.
        dataset: MedMNIST flag; ``task`` and ``labels`` come from medmnist's INFO.
        in_chans, input_size, mean, std, resize: model-input preprocessing; ``mean``/``std`` have
            one value per input channel.
        recipe: config file under ``training/configs/`` that builds it; ``overrides`` are its pins
            (``key=value``), derived from the fields above (:meth:`pins`).
        weights: where prebuilt weights live (``hf-hub:<repo_id>``), or ``None`` to build locally.
        teacher: teacher identity for distilled students and probes (hub id or zoo name).
        teacher_input_size: the resolution the teacher sees (distilled students).
        license: the dataset's licence, which the weights inherit.
        tag: the variant tag (``""`` for the default of a base name).
        small_stem: CNN students: MedMNIST's 3x3 stride-1 stem without max-pool (28 px input).
        data_size: which MedMNIST file the images come from (28 -> ``<flag>.npz``, else ``<flag>_<size>.npz``).
    """

    name: str
    method: str
    arch: str
    dataset: str
    task: str
    labels: tuple[str, ...]
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    recipe: str
    overrides: tuple[str, ...] = ()
    weights: str | None = None
    teacher: str | None = None
    license: str = ""
    resize: str = "bilinear"
    tag: str = ""
    small_stem: bool = False
    data_size: int = 28
    teacher_input_size: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not (len(self.mean) == len(self.std) == self.in_chans):
            raise ValueError(f"{self.name}: mean/std need one value per input channel ({self.in_chans}), got "
                             f"{len(self.mean)} and {len(self.std)}")

    @property
    def base_name(self) -> str:
        """The name without its variant tag."""
        return self.name.split(".", 1)[0]

    @property
    def num_outputs(self) -> int:
        # function-level import: zoo.tasks imports torch, which listing the registry (`zoo list`) must not
        from zoo.tasks import get_task

        return get_task(self.task).num_outputs(len(self.labels))

    @property
    def preprocess(self) -> Preprocess:
        # function-level import: zoo.data imports torch, which listing the registry (`zoo list`) must not
        from zoo.data import Preprocess

        return Preprocess(self.input_size, self.in_chans, self.mean, self.std, self.resize)

    @property
    def is_student(self) -> bool:
        return self.arch in STUDENT_ARCHS + TEST_ARCHS

    def pins(self) -> dict[str, Any]:
        """The config values this entry fixes, by dotted key (parsed from ``overrides``)."""
        import yaml  # cheap; kept local so the registry module itself stays a plain table

        out = {}
        for item in self.overrides:
            key, _, raw = item.partition("=")
            out[key] = yaml.safe_load(raw)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ZooEntry:
        if not isinstance(d, Mapping):
            raise ValueError(f"a zoo entry must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"zoo entry has unknown fields {sorted(unknown)}; is the zoo package older than the entry?"
            )
        kw = dict(d)
        for k in ("labels", "mean", "std", "overrides"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        try:
            return cls(**kw)
        except TypeError as e:  # a missing field
            raise ValueError(f"zoo entry is incomplete: {e}") from None


def _pin(key: str, value: Any) -> str:
    """``key=value`` with value written as YAML flow (``data.mean=[0.5, 0.5, 0.5]``)."""
    if isinstance(value, (list, tuple)):
        return f"{key}=[{', '.join(_scalar(v) for v in value)}]"
    return f"{key}={_scalar(value)}"


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _named(base: str, tag: str) -> str:
    return f"{base}.{tag}" if tag else base


# ----------------------------------------------------------------------------------------- builders


def student_entry(method: str, arch: str, info: DatasetInfo, *, tag: str = "", input_size: int = 28,
                  small_stem: bool = True, resize: str = "bilinear", data_size: int = 28,
                  teacher: str | None = None, teacher_input_size: int | None = None) -> ZooEntry:
    """A baseline or distilled student; every field explicit (the variant tables pin some)."""
    c = info.n_channels  # students take the data's own channel count
    mean, std = MEDMNIST_MEAN * c, MEDMNIST_STD * c
    pins = [_pin("method", method), _pin("model.arch", arch), _pin("data.dataset", info.flag),
            _pin("data.size", data_size), _pin("data.input_size", input_size), _pin("data.resize", resize),
            _pin("data.mean", mean), _pin("data.std", std), _pin("model.small_stem", small_stem)]
    if method == "medalmighty":
        pins += [_pin("teacher.backbone", teacher), _pin("teacher.input_size", teacher_input_size)]
    return ZooEntry(
        name=_named(f"{method}-{arch}-{info.flag}", tag), method=method, arch=arch, dataset=info.flag, task=info.task,
        labels=info.labels, in_chans=c, input_size=input_size, mean=mean, std=std,
        recipe="medalmighty/default.yaml", overrides=tuple(pins), teacher=teacher, license=info.license, resize=resize,
        tag=tag, small_stem=small_stem, data_size=data_size,
        teacher_input_size=teacher_input_size if method == "medalmighty" else None)


def ensemble_entry(arch: str, info: DatasetInfo, *, tag: str = "", size: int = 3, input_size: int = 28,
                   small_stem: bool = True, resize: str = "bilinear", data_size: int = 28) -> ZooEntry:
    """``size`` supervised students (seeds ``seed``, ``seed + 1``, ...) whose logits are averaged: a teacher
    that can win offline, and a model in its own right (not the paper's method)."""
    e = student_entry("baseline", arch, info, tag=tag, input_size=input_size, small_stem=small_stem, resize=resize,
                      data_size=data_size)
    pins = tuple(_pin("method", "ensemble") if p.startswith("method=") else p for p in e.overrides)
    return dataclasses.replace(e, name=_named(f"ensemble-{arch}-{info.flag}", tag), method="ensemble",
                               overrides=pins + (_pin("ensemble.size", size),))


def linear_entry(arch: str, info: DatasetInfo, *, tag: str = "", input_size: int = HUB_TEACHER_SIZE,
                 resize: str = "bilinear", data_size: int = 28) -> ZooEntry:
    """A frozen hub ViT with a linear head: the paper's "DINOv2 + linear" baseline and teacher."""
    hub_id = TEACHER_BACKBONES[arch]
    pins = [_pin("method", "linear"), _pin("data.dataset", info.flag), _pin("data.size", data_size),
            _pin("data.resize", resize), _pin("teacher.backbone", hub_id), _pin("teacher.input_size", input_size)]
    return ZooEntry(
        name=_named(f"linear-{arch}-{info.flag}", tag), method="linear", arch=arch, dataset=info.flag, task=info.task,
        labels=info.labels, in_chans=3,  # ViT teachers are RGB; grey images are replicated
        input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, recipe="medalmighty/default.yaml",
        overrides=tuple(pins), teacher=hub_id, license=info.license, resize=resize, tag=tag, data_size=data_size,
        teacher_input_size=input_size)


def dinomx_entry(arch: str, info: DatasetInfo, *, tag: str = "", input_size: int = 28, data_size: int = 28
                 ) -> ZooEntry:
    """A DINO-MX backbone pretrained on the dataset's training images, on the dataset's own channels."""
    c = info.n_channels
    mean, std = MEDMNIST_MEAN * c, MEDMNIST_STD * c
    pins = [_pin("model.backbone", arch), _pin("data.datasets", [info.flag]), _pin("data.size", data_size),
            _pin("data.mean", mean), _pin("data.std", std), _pin("model.in_chans", c),
            _pin("crops.global_size", input_size)]
    return ZooEntry(
        name=_named(f"dinomx-{arch}-{info.flag}", tag), method="dinomx", arch=arch, dataset=info.flag, task=info.task,
        labels=info.labels, in_chans=c, input_size=input_size, mean=mean, std=std, recipe="dinomx/default.yaml",
        overrides=tuple(pins), license=info.license, tag=tag, data_size=data_size)


def finetune_entry(arch: str, info: DatasetInfo, *, tag: str = "", input_size: int = 28, data_size: int = 28
                   ) -> ZooEntry:
    """A DINO-MX backbone of the dataset fine-tuned end to end with the labels (its linear probe as the
    head's start): a teacher that can win offline, not the paper's frozen teacher (named as such)."""
    c = info.n_channels
    mean, std = MEDMNIST_MEAN * c, MEDMNIST_STD * c
    backbone = f"dinomx-{arch}-{info.flag}"
    pins = [_pin("method", "finetune"), _pin("data.dataset", info.flag), _pin("data.size", data_size),
            _pin("teacher.backbone", backbone), _pin("teacher.input_size", input_size)]
    return ZooEntry(
        name=_named(f"finetune-{arch}-{info.flag}", tag), method="finetune", arch=arch, dataset=info.flag,
        task=info.task, labels=info.labels, in_chans=c, input_size=input_size, mean=mean, std=std,
        recipe="medalmighty/finetune.yaml", overrides=tuple(pins), teacher=backbone, license=info.license, tag=tag,
        data_size=data_size, teacher_input_size=input_size)


# ----------------------------------------------------------------------------------------- variants

# Student resolutions: MedMNIST v2's ResNet (28) and ResNet (224) (28 px images upsampled, nearest), and the
# MedMNIST+ 224 px images themselves (``<flag>_224.npz``).
STUDENT_VARIANTS: dict[str, dict[str, Any]] = {
    "": dict(input_size=28, small_stem=True, resize="bilinear"),
    "224": dict(input_size=224, small_stem=False, resize="nearest"),
    "plus224": dict(input_size=224, small_stem=False, resize="bilinear", data_size=224),
}
# Distillation teachers of a 28 px student: tag -> (teacher, its input size); {flag} is the dataset.
TEACHER_VARIANTS: dict[str, tuple[str, int]] = {
    "": (TEACHER_BACKBONES["dinov2-vitb14"], HUB_TEACHER_SIZE),  # the paper's
    "dinov2s-224": (TEACHER_BACKBONES["dinov2-vits14"], HUB_TEACHER_SIZE),
    "dinov2l-224": (TEACHER_BACKBONES["dinov2-vitl14"], HUB_TEACHER_SIZE),
    "dinomx-28": ("dinomx-vit-mini-p4-{flag}", 28),  # offline: our own DINO-MX backbone + a linear probe
    "ens-28": ("ensemble-{arch}-{flag}", 28),  # offline: an ensemble of supervised students of the student's size
    "ft-28": ("finetune-vit-mini-p4-{flag}", 28),  # offline: our DINO-MX backbone fine-tuned with the labels
}


def _declare() -> dict[str, ZooEntry]:
    entries: dict[str, ZooEntry] = {}

    def add(e: ZooEntry) -> None:
        if e.name in entries:
            raise ValueError(f"zoo entry {e.name} is declared twice")
        entries[e.name] = e

    for flag in datasets_2d():
        info = dataset_info(flag)
        for arch in STUDENT_ARCHS:
            for tag, sv in STUDENT_VARIANTS.items():
                add(student_entry("baseline", arch, info, tag=tag, **sv))
                teacher, size = TEACHER_VARIANTS[""]
                add(student_entry("medalmighty", arch, info, tag=tag, teacher=teacher, teacher_input_size=size, **sv))
            for tag, (teacher, size) in TEACHER_VARIANTS.items():
                if tag:  # teacher variants of the 28 px student
                    add(student_entry("medalmighty", arch, info, tag=tag, teacher=teacher.format(flag=flag, arch=arch),
                                      teacher_input_size=size, **STUDENT_VARIANTS[""]))
            add(ensemble_entry(arch, info, **STUDENT_VARIANTS[""]))
        for arch in TEACHER_BACKBONES:
            add(linear_entry(arch, info))
        for arch in DINOMX_BACKBONES:
            add(dinomx_entry(arch, info))
            add(finetune_entry(arch, info))
    return entries


_REGISTRY: dict[str, ZooEntry] | None = None


def registry() -> dict[str, ZooEntry]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _declare()
    return _REGISTRY


def list_models(pattern: str | None = None, variants: bool = False) -> list[str]:
    """Names of registered entries, sorted; ``pattern`` is a glob (``*pathmnist``) or a substring.

    As timm lists architectures unless asked for their pretrained tags, only the default of each base
    name is listed unless ``variants`` (or a pattern that contains a ``.``) asks for the tagged ones.
    """
    names = sorted(n for n in registry() if variants or "." not in n or (pattern and "." in pattern))
    if not pattern:
        return names
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, glob)]


def variants_of(name: str) -> list[str]:
    """Every registered name that shares ``name``'s base name (the default first)."""
    base = name.split(".", 1)[0]
    return sorted((n for n in registry() if n.split(".", 1)[0] == base), key=lambda n: (n != base, n))


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0])


def get_entry(name: str) -> ZooEntry:
    """The registered entry called ``name``; an unknown name lists the closest ones."""
    reg = registry()
    if name in reg:
        return reg[name]
    close = difflib.get_close_matches(name, list(reg), n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else " Run `zoo list` to see all names."
    raise UnknownModelError(f"unknown zoo model {name!r}.{hint}")
