"""The MedAlmighty recipe family's config, as typed sections (``training/configs/medalmighty/default.yaml``).

The YAML is merged strictly (:mod:`training.config`), then turned into these frozen dataclasses once,
with types and ranges checked, so the recipe reads ``cfg.train.lr`` and a bad value is a one-line
error before anything trains. A test keeps the dataclasses and the default YAML in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from training.config import ConfigError, check, typed
from training.distributed import STRATEGIES
from zoo.data import dataset_info
from zoo.registry import METHODS, PROBE_METHODS, STUDENT_ARCHS, TEST_ARCHS

Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["multistep", "cosine", "constant"]


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    size: Literal[28, 64, 128, 224]
    input_size: int
    resize: Literal["bilinear", "nearest"]
    root: str | None
    download: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        check(self.input_size >= 8, "data.input_size", f"must be at least 8 pixels, got {self.input_size}")
        check(len(self.mean) >= 1 and len(self.mean) == len(self.std), "data.mean/data.std",
              f"need the same number of values (one, or one per channel), got {list(self.mean)} / {list(self.std)}")
        check(all(s > 0 for s in self.std), "data.std", f"must be positive, got {list(self.std)}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    small_stem: bool


@dataclass(frozen=True)
class TeacherConfig:
    backbone: str | tuple[str, ...]
    pooling: Literal["cls", "mean", "cls+mean"]
    input_size: int | None
    revision: str | None
    batch_size: int

    def __post_init__(self) -> None:
        check(self.input_size is None or self.input_size >= 8, "teacher.input_size",
              f"must be at least 8 pixels (or null: the teacher's own resolution), got {self.input_size}")
        check(self.batch_size >= 1, "teacher.batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int
    optimizer: Optimizer
    schedule: Schedule
    lr: float
    batch_size: int
    weight_decay: float

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "probe.epochs", f"must be at least 1, got {self.epochs}")
        check(self.batch_size >= 1, "probe.batch_size", f"must be at least 1, got {self.batch_size}")
        check(self.lr > 0, "probe.lr", f"must be positive, got {self.lr}")
        check(self.weight_decay >= 0, "probe.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class DistillConfig:
    alpha: float
    temperature: float
    require_stronger_teacher: bool
    search: Literal["none", "grid"]
    grid: tuple[tuple[float, float], ...]
    feature_weight: float

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "distill.alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
        check(len(self.grid) >= 1 and all(t > 0 and 0 <= a <= 1 for t, a in self.grid), "distill.grid",
              f"must be (temperature > 0, alpha in [0, 1]) pairs, got {[list(p) for p in self.grid]}")
        check(self.feature_weight >= 0, "distill.feature_weight", f"must be >= 0, got {self.feature_weight}")


@dataclass(frozen=True)
class EnsembleConfig:
    size: int
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        check(self.size >= 2, "ensemble.size", f"must be at least 2, got {self.size}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    min_steps: int
    max_steps: int
    batch_size: int
    optimizer: Optimizer
    lr: float
    weight_decay: float
    momentum: float
    schedule: Schedule
    milestones: tuple[float, ...]
    gamma: float
    warmup_epochs: float
    amp: Literal["none", "bf16", "auto"]
    channels_last: bool
    eval_batch_size: int
    log_test_every_epoch: bool
    progress: bool
    augment: Literal["none", "light"]
    flip: Literal["auto", "none", "horizontal", "both"]
    crop_padding: int
    ema: float

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", f"must be at least 1, got {self.epochs}")
        check(0 <= self.crop_padding <= 16, "train.crop_padding",
              f"must be within [0, 16] pixels, got {self.crop_padding}")
        check(self.ema == 0 or 0 < self.ema < 1, "train.ema", f"must be 0 (off) or a decay in (0, 1), got {self.ema}")
        check(self.min_steps >= 0, "train.min_steps", f"must be >= 0, got {self.min_steps}")
        check(self.max_steps == 0 or self.max_steps >= self.min_steps, "train.max_steps",
              f"must be 0 (no cap) or at least train.min_steps ({self.min_steps}), got {self.max_steps}")
        check(self.batch_size >= 1, "train.batch_size", f"must be at least 1, got {self.batch_size}")
        check(self.lr > 0, "train.lr", f"must be positive, got {self.lr}")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 < m < 1 for m in self.milestones), "train.milestones",
              f"must be fractions of train.epochs in (0, 1), got {list(self.milestones)}")
        check(0 < self.gamma <= 1, "train.gamma", f"must be in (0, 1], got {self.gamma}")
        check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs",
              f"must be within [0, train.epochs], got {self.warmup_epochs}")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", f"must be at least 1, got {self.eval_batch_size}")


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str
    backend: Literal["auto", "gloo", "nccl"]
    zero_stage: int

    def __post_init__(self) -> None:
        check(self.strategy in STRATEGIES, "distributed.strategy",
              f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(self.zero_stage in (1, 2, 3), "distributed.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage!r}")


@dataclass(frozen=True)
class MedAlmightyConfig:
    """The whole resolved config of a MedAlmighty run (students, probes and distillation)."""

    recipe: str
    method: str
    seed: int
    run_name: str | None
    output_dir: str
    data: DataConfig
    model: ModelConfig
    teacher: TeacherConfig
    probe: ProbeConfig
    distill: DistillConfig
    ensemble: EnsembleConfig
    train: TrainConfig
    distributed: DistributedConfig

    def __post_init__(self) -> None:
        check(self.method in METHODS and self.method != "dinomx", "method",
              f"must be one of {', '.join(m for m in METHODS if m != 'dinomx')}, got {self.method!r}")
        archs = STUDENT_ARCHS + TEST_ARCHS
        check(self.method in PROBE_METHODS or self.model.arch in archs, "model.arch",
              f"must be one of {', '.join(archs)}, got {self.model.arch!r}")
        check(0 <= self.seed < 2**63, "seed", f"must be a whole number in [0, 2^63), got {self.seed}")


def parse(cfg: Mapping[str, Any]) -> MedAlmightyConfig:
    """Check a resolved MedAlmighty config dict and return it typed (one-line ConfigErrors)."""
    if cfg.get("recipe") != "medalmighty":
        raise ConfigError(f"{cfg.get('recipe')} is not a medalmighty config")
    out = typed(MedAlmightyConfig, cfg)
    dataset_info(out.data.dataset)  # unknown flags fail here, with suggestions
    return out
