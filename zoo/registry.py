"""The zoo registry: one frozen dataclass per named model, ``<method>-<arch>-<dataset>``.

Entries are declared explicitly in :func:`_declare` (no import side effects, no ``__dict__``
lookups). Export, serving and benchmarks read preprocessing and labels from the entry only.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field

from zoo.data import DatasetInfo, Preprocess, dataset_info, datasets_2d

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
METHODS = ("baseline", "medalmighty", "linear", "dinomx")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEDMNIST_MEAN = (0.5,)
MEDMNIST_STD = (0.5,)


@dataclass(frozen=True)
class ZooEntry:
    """Everything needed to build, load, preprocess for and describe one zoo model.

    Attributes:
        name: ``<method>-<arch>-<dataset>``.
        method: ``baseline`` (student alone), ``medalmighty`` (distilled student), ``linear``
            (frozen ViT teacher + linear head), ``dinomx`` (a self-supervised ViT backbone, no head).
        arch: a student in :data:`STUDENT_ARCHS` or a teacher in :data:`TEACHER_BACKBONES`.
        dataset: MedMNIST flag; ``task`` and ``labels`` come from medmnist's INFO.
        in_chans, input_size, mean, std: model-input preprocessing.
        recipe: config file under ``configs/`` that builds it; ``overrides`` are pinned ``key=value``.
        weights: where prebuilt weights live (``hf-hub:<repo_id>``), or ``None`` to build locally.
        teacher: teacher lineage (backbone source) for distilled students and probes.
        license: the dataset's licence, which the weights inherit.
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
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "binary-class" else len(self.labels)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.in_chans, self.mean, self.std, self.resize)

    @property
    def is_student(self) -> bool:
        return self.arch in STUDENT_ARCHS + TEST_ARCHS

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ZooEntry:
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
        return cls(**kw)


def _student_entry(method: str, arch: str, info: DatasetInfo) -> ZooEntry:
    return ZooEntry(
        name=f"{method}-{arch}-{info.flag}",
        method=method,
        arch=arch,
        dataset=info.flag,
        task=info.task,
        labels=info.labels,
        in_chans=info.n_channels,  # students take the data's own channel count
        input_size=28,
        mean=MEDMNIST_MEAN * info.n_channels,
        std=MEDMNIST_STD * info.n_channels,
        recipe="medalmighty/default.yaml",
        overrides=(f"method={method}", f"model.arch={arch}", f"data.dataset={info.flag}"),
        teacher=TEACHER_BACKBONES["dinov2-vitb14"] if method == "medalmighty" else None,
        license=info.license,
    )


def _linear_entry(arch: str, info: DatasetInfo) -> ZooEntry:
    hub_id = TEACHER_BACKBONES[arch]
    return ZooEntry(
        name=f"linear-{arch}-{info.flag}",
        method="linear",
        arch=arch,
        dataset=info.flag,
        task=info.task,
        labels=info.labels,
        in_chans=3,  # ViT teachers are RGB; grey images are replicated
        input_size=28,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recipe="medalmighty/default.yaml",
        overrides=("method=linear", f"teacher.backbone={hub_id}", f"data.dataset={info.flag}"),
        teacher=hub_id,
        license=info.license,
    )


def _dinomx_entry(arch: str, info: DatasetInfo) -> ZooEntry:
    return ZooEntry(
        name=f"dinomx-{arch}-{info.flag}",
        method="dinomx",
        arch=arch,
        dataset=info.flag,
        task=info.task,
        labels=info.labels,
        in_chans=info.n_channels,  # the backbone takes the data's own channels (1 for grey sets)
        input_size=28,
        mean=MEDMNIST_MEAN * info.n_channels,
        std=MEDMNIST_STD * info.n_channels,
        recipe="dinomx/default.yaml",
        overrides=(f"model.backbone={arch}", f"data.datasets=[{info.flag}]"),
        license=info.license,
    )


def _declare() -> dict[str, ZooEntry]:
    entries: dict[str, ZooEntry] = {}
    for flag in datasets_2d():
        info = dataset_info(flag)
        for arch in STUDENT_ARCHS:
            for method in ("baseline", "medalmighty"):
                e = _student_entry(method, arch, info)
                entries[e.name] = e
        for arch in TEACHER_BACKBONES:
            e = _linear_entry(arch, info)
            entries[e.name] = e
        for arch in DINOMX_BACKBONES:
            e = _dinomx_entry(arch, info)
            entries[e.name] = e
    return entries


_REGISTRY: dict[str, ZooEntry] | None = None


def registry() -> dict[str, ZooEntry]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _declare()
    return _REGISTRY


def list_models(pattern: str | None = None) -> list[str]:
    """Names of registered entries, sorted; ``pattern`` is a glob (``*pathmnist``) or a substring."""
    names = sorted(registry())
    if not pattern:
        return names
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatchcase(n, glob)]


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
