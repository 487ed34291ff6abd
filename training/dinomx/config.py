"""The DINO-MX recipe family's config, as typed sections (``training/configs/dinomx/default.yaml``).

Merged strictly (:mod:`training.config`), then turned into these frozen dataclasses once, with types
and ranges checked, so the task and the loop read ``cfg.optim.lr``. A test keeps them and the default
YAML in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from training.config import ConfigError, check, typed
from training.distributed import STRATEGIES
from zoo.data import dataset_info

Centering = Literal["centering", "sinkhorn"]


def _fraction(v: float, key: str) -> None:
    check(0.0 <= v <= 1.0, key, f"must be a fraction of training in [0, 1], got {v}")


def _pair(v: tuple[float, float], key: str, lo: float = 0.0, hi: float = 1.0) -> None:
    check(lo <= v[0] <= v[1] <= hi, key, f"must be [min, max] with {lo} <= min <= max <= {hi}, got {list(v)}")


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[str, ...]
    size: Literal[28, 64, 128, 224]
    root: str | None
    download: bool
    max_images: int
    regions: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        check(len(self.datasets) > 0, "data.datasets",
              "is empty; name at least one MedMNIST flag, e.g. data.datasets=[bloodmnist]")
        check(self.max_images >= 0, "data.max_images", f"must be >= 0 (0 = all), got {self.max_images}")
        check(all(s > 0 for s in self.std), "data.std", f"must be positive, got {list(self.std)}")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str
    revision: str | None
    in_chans: int | Literal["auto"]
    channel_init: Literal["mean", "repeat"]
    drop_path: float

    def __post_init__(self) -> None:
        check(self.in_chans == "auto" or self.in_chans >= 1, "model.in_chans",
              f"must be auto or >= 1, got {self.in_chans}")
        check(0.0 <= self.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {self.drop_path}")


@dataclass(frozen=True)
class HeadConfig:
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int
    norm_last_layer: bool
    ibot_separate_head: bool

    def __post_init__(self) -> None:
        for k in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
            check(getattr(self, k) >= 1, f"head.{k}", f"must be at least 1, got {getattr(self, k)}")


@dataclass(frozen=True)
class CropsConfig:
    global_size: int
    global_scale: tuple[float, float]
    local_number: int
    local_size: int
    local_scale: tuple[float, float]
    flip: float
    color_jitter: float
    brightness: float
    contrast: float
    saturation: float
    grayscale: float
    blur: tuple[float, float, float]
    solarize: tuple[float, float, float]
    blur_sigma: tuple[float, float]
    label_guided: float

    def __post_init__(self) -> None:
        check(self.global_size >= 4, "crops.global_size", f"must be at least 4 pixels, got {self.global_size}")
        check(self.local_size >= 4, "crops.local_size", f"must be at least 4 pixels, got {self.local_size}")
        check(self.local_number >= 0, "crops.local_number", f"must be >= 0, got {self.local_number}")
        for k in ("flip", "color_jitter", "grayscale", "label_guided"):
            check(0.0 <= getattr(self, k) <= 1.0, f"crops.{k}",
                  f"must be a probability in [0, 1], got {getattr(self, k)}")
        for k in ("blur", "solarize"):
            check(all(0.0 <= p <= 1.0 for p in getattr(self, k)), f"crops.{k}",
                  f"must be probabilities in [0, 1], got {list(getattr(self, k))}")


@dataclass(frozen=True)
class DinoConfig:
    loss_weight: float
    centering: Centering
    center_momentum: float
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: float

    def __post_init__(self) -> None:
        check(self.loss_weight >= 0, "dino.loss_weight", f"must be >= 0, got {self.loss_weight}")
        for k in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check(getattr(self, k) > 0, f"dino.{k}", f"must be > 0, got {getattr(self, k)}")
        check(0 <= self.center_momentum <= 1, "dino.center_momentum", f"must be in [0, 1], got {self.center_momentum}")
        _fraction(self.warmup_teacher_temp_epochs, "dino.warmup_teacher_temp_epochs")


@dataclass(frozen=True)
class IbotConfig:
    loss_weight: float
    centering: Centering
    mask_probability: float
    mask_ratio: tuple[float, float]

    def __post_init__(self) -> None:
        check(self.loss_weight >= 0, "ibot.loss_weight", f"must be >= 0, got {self.loss_weight}")
        check(0 <= self.mask_probability <= 1, "ibot.mask_probability",
              f"must be within [0, 1], got {self.mask_probability}")
        _pair(self.mask_ratio, "ibot.mask_ratio")


@dataclass(frozen=True)
class KoleoConfig:
    loss_weight: float

    def __post_init__(self) -> None:
        check(self.loss_weight >= 0, "koleo.loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class GramConfig:
    loss_weight: float
    start: float
    refresh_every: float

    def __post_init__(self) -> None:
        check(self.loss_weight >= 0, "gram.loss_weight", f"must be >= 0, got {self.loss_weight}")
        _fraction(self.start, "gram.start")
        _fraction(self.refresh_every, "gram.refresh_every")


@dataclass(frozen=True)
class OptimConfig:
    epochs: float
    steps: int
    batch_size: int
    lr: float
    lr_scaling: Literal["none", "linear"]
    min_lr: float
    warmup: float
    weight_decay: float
    weight_decay_end: float
    layer_decay: float
    clip_grad: float
    freeze_last_layer: float
    momentum_teacher: float
    momentum_teacher_end: float
    amp: Literal["none", "bf16", "auto"]
    compile: bool
    fused: bool
    low_precision_stream: bool

    @property
    def peak_lr(self) -> float:
        """The lr the schedule peaks at: ``lr`` (``lr_scaling: none``), or DINO's linear scaling rule
        ``lr * batch_size / 256`` (``linear``: ``lr`` is then the rate of a batch of 256)."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "optim.epochs", f"must be >= 0, got {self.epochs}")
        check(self.steps >= 0, "optim.steps", f"must be >= 0 (0: use optim.epochs), got {self.steps}")
        check(self.steps > 0 or self.epochs > 0, "optim.epochs", "and optim.steps are both 0: the run has no steps")
        check(self.batch_size >= 2, "optim.batch_size", f"must be at least 2, got {self.batch_size}")
        check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        check(self.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {self.min_lr}")
        for k in ("warmup", "freeze_last_layer"):
            _fraction(getattr(self, k), f"optim.{k}")
        check(0 < self.layer_decay <= 1, "optim.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0 = off), got {self.clip_grad}")
        for k in ("momentum_teacher", "momentum_teacher_end"):
            check(0 <= getattr(self, k) <= 1, f"optim.{k}", f"must be in [0, 1], got {getattr(self, k)}")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool
    r: int
    alpha: int
    dropout: float
    targets: str | tuple[str, ...]


@dataclass(frozen=True)
class FreezeConfig:
    blocks: int
    patch_embed: bool


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None
    loss: Literal["auto", "dino", "feature"]


@dataclass(frozen=True)
class StrategyConfig:
    lora: LoraConfig
    freeze: FreezeConfig
    distill: DistillConfig


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
class CheckpointConfig:
    every: int
    resume: bool

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 = none), got {self.every}")


@dataclass(frozen=True)
class EvalConfig:
    datasets: tuple[str, ...] | None
    knn_k: int
    knn_temperature: float
    linear: bool
    linear_epochs: int
    max_train: int

    def __post_init__(self) -> None:
        check(self.knn_k >= 1, "eval.knn_k", f"must be at least 1, got {self.knn_k}")
        check(self.knn_temperature > 0, "eval.knn_temperature", f"must be > 0, got {self.knn_temperature}")
        check(self.linear_epochs >= 1, "eval.linear_epochs", f"must be at least 1, got {self.linear_epochs}")


@dataclass(frozen=True)
class LogConfig:
    every: int
    progress: bool


@dataclass(frozen=True)
class DinoMXConfig:
    """The whole resolved config of a DINO-MX pretraining run."""

    recipe: str
    method: str
    seed: int
    run_name: str | None
    output_dir: str
    data: DataConfig
    model: ModelConfig
    head: HeadConfig
    crops: CropsConfig
    dino: DinoConfig
    ibot: IbotConfig
    koleo: KoleoConfig
    gram: GramConfig
    optim: OptimConfig
    strategy: StrategyConfig
    distributed: DistributedConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    log: LogConfig

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**62, "seed", f"must be a whole number in [0, 2^62), got {self.seed}")


def parse(cfg: Mapping[str, Any]) -> DinoMXConfig:
    """Check a resolved DINO-MX config dict and return it typed (one-line ConfigErrors)."""
    if cfg.get("recipe") != "dinomx":
        raise ConfigError(f"{cfg.get('recipe')} is not a dinomx config; `zoo pretrain` takes dinomx/*.yaml configs")
    data = dict(cfg)
    d = dict(data["data"]) if isinstance(data.get("data"), Mapping) else data.get("data")
    if isinstance(d, dict) and isinstance(d.get("datasets"), str):  # `data.datasets=bloodmnist` means one flag
        d["datasets"] = [d["datasets"]]
        data["data"] = d
    e = dict(data["eval"]) if isinstance(data.get("eval"), Mapping) else data.get("eval")
    if isinstance(e, dict) and isinstance(e.get("datasets"), str):
        e["datasets"] = [e["datasets"]]
        data["eval"] = e
    out = typed(DinoMXConfig, data)
    for flag in out.data.datasets + (out.eval.datasets or ()):
        dataset_info(flag)
    return out
