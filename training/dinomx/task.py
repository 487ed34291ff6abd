"""DINO-MX's meta-architecture (DINOv2's ``SSLMetaArch``): student, teacher, Gram anchor and losses.

:class:`DinoTask` owns the models, the step's data (crops and iBOT masks drawn from generators seeded
by ``(seed, step)``) and the losses, and answers the loop's three calls (:mod:`training.loop`):
``forward(step) -> {"loss": total, "dino": ..., ...}``, ``before_update`` (the prototype layer stays
frozen for the first steps) and ``after_update`` (the EMA teacher follows the student; the Gram
anchor is refreshed on its schedule). The loss terms are one table, :data:`LOSS_TERMS`: adding a
loss is a module in :mod:`training.dinomx.losses`, a row there, and its YAML section. Each step also
leaves the collapse monitor's figures in ``monitor_values`` (:mod:`training.dinomx.monitor`), which
the recipe logs with the losses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from training import distributed as D
from training.config import ConfigError
from training.dinomx import fused
from training.dinomx.config import DinoMXConfig, HeadConfig
from training.dinomx.crops import CropConfig, MultiCrop
from training.dinomx.data import PretrainData
from training.dinomx.losses import DINOLoss, FeatureDistillLoss, GramLoss, IBOTPatchLoss, KoLeoLoss
from training.dinomx.masking import batch_masks
from training.dinomx.model import SSLModel, apply_lora, freeze
from training.dinomx.monitor import CollapseMonitor, burn_in_steps, step_figures
from training.loop import amp_dtype
from training.schedules import cosine, teacher_temperature
from zoo.backbones import ViTBackbone, create_model
from zoo.data import Preprocess
from zoo.loading import backbone_dir

HEADS_FILE = "dinomx_heads.safetensors"
HEADS_CONFIG = "dinomx_heads.json"


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of one kind of random draw (``stream``) of one step: a resumed run draws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 97 + stream) % (2**63))


def module_seed(seed: int, step: int, rank: int) -> int:
    """The global torch seed of step ``step`` on process ``rank``: the stochastic-depth / dropout draws.

    Those draws are per sample, and each process holds other samples, so each process draws its
    own (one seed for all would give image i of every process the same drop pattern); a resumed run
    and a rerun with the same number of processes draw the same.
    """
    return (seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63)


@dataclass
class StepTensors:
    """What the loss terms of one step read (``b`` images on this process, crop-major rows)."""

    student: dict[str, torch.Tensor | None]
    t_cls: torch.Tensor
    t_patches: torch.Tensor | None  # None when no loss reads the teacher's patch tokens
    t_dino: torch.Tensor | None
    t_bottleneck: torch.Tensor | None
    t_ibot: torch.Tensor | None
    masks: torch.Tensor | None
    anchor: torch.Tensor | None
    teacher_temp: float
    b: int
    t_dino_probs: torch.Tensor | None = None  # the DINO targets, once the dino term made them (the monitor reads them)


class DinoTask:
    """Student, teacher and losses of a DINO-MX run (see the module doc).

    Attributes:
        student: the trained :class:`SSLModel`; ``teacher``: its EMA copy, or the frozen distillation
            teacher; ``gram_anchor``: the teacher snapshot Gram anchoring holds patch similarities to.
        total: the run's number of steps; ``lr``, ``wd``, ``momentum``, ``t_temp``: per-step schedules.
    """

    nonfinite_hint = "lower optim.lr or raise dino.warmup_teacher_temp_epochs"

    def __init__(self, cfg: DinoMXConfig, data: PretrainData, env: D.DistEnv):
        self.cfg, self.data, self.env = cfg, data, env
        m, o = cfg.model, cfg.optim
        self.in_chans = data.images.shape[1]
        n = data.images.shape[0]
        self.batch = o.batch_size
        if n < self.batch:
            raise ConfigError(f"{n} training images is fewer than optim.batch_size={self.batch}; lower the batch")
        self.offset, self.local_batch = env.shard(self.batch)
        self.steps_per_epoch = n // self.batch
        self.total = o.steps if o.steps > 0 else int(o.epochs * self.steps_per_epoch)
        if self.total < 1:
            raise ConfigError("the run has no steps; raise optim.epochs or optim.steps")
        torch.manual_seed(cfg.seed)

        encoder = ViTBackbone(create_model(m.backbone, self.in_chans, m.channel_init, m.revision, m.drop_path,
                                           cfg.crops.global_size), pooling="cls")
        s = cfg.strategy
        self.distill_mode = "dino"
        self.distill_teacher, distill_dim = self._distill_teacher()
        if s.freeze.blocks or s.freeze.patch_embed:
            freeze(encoder, s.freeze.blocks, s.freeze.patch_embed)
        if s.lora.enabled:
            apply_lora(encoder, s.lora.r, s.lora.alpha, s.lora.dropout,
                       s.lora.targets if isinstance(s.lora.targets, str) else list(s.lora.targets))
        self.student = SSLModel(encoder, cfg.head, distill_dim).to(env.device)
        # Patch tokens of the global crops only where a loss reads them (the fused path then skips the
        # last block's patch rows); the local crops' are never read.
        feature = self.distill_teacher is not None and self.distill_mode == "feature"
        self.student.need_patches = cfg.ibot.loss_weight > 0 or cfg.gram.loss_weight > 0 or feature
        self.teacher_patches = (cfg.ibot.loss_weight > 0 and self.dino_targets) or feature
        self.student.fused = self._fused(encoder)
        self.dtype = amp_dtype(o.amp, env.device)
        if o.low_precision_stream and self.student.fused and self.dtype is not None:
            self.student.stream_dtype = self.dtype  # the teacher, a copy, inherits it
        self.teacher = self.distill_teacher if self.distill_teacher is not None else copy.deepcopy(self.student)
        self.teacher.requires_grad_(False).eval()
        self.gram_anchor: SSLModel | None = None
        self.runner: D.Runner | None = None

        K, dn, ib = cfg.head.out_dim, cfg.dino, cfg.ibot
        self.dino_loss = DINOLoss(K, dn.student_temp, dn.center_momentum, dn.centering).to(env.device)
        self.ibot_loss = IBOTPatchLoss(K, dn.student_temp, dn.center_momentum, ib.centering).to(env.device)
        self.koleo = KoLeoLoss()
        self.gram = GramLoss()
        self.feature_distill = FeatureDistillLoss()
        c = cfg.crops
        self.prep = Preprocess(c.global_size, self.in_chans, cfg.data.mean, cfg.data.std)  # per-channel mean/std
        self.crops = MultiCrop(CropConfig(
            global_size=c.global_size, global_scale=c.global_scale, local_number=c.local_number,
            local_size=c.local_size, local_scale=c.local_scale, flip=c.flip, color_jitter=c.color_jitter,
            brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, grayscale=c.grayscale,
            blur=c.blur, solarize=c.solarize, blur_sigma=c.blur_sigma, label_guided=c.label_guided,
            mean=self.prep.mean, std=self.prep.std))
        self.grid = encoder.grid(c.global_size)

        T = self.total
        self.lr = cosine(o.peak_lr, o.min_lr, T, int(o.warmup * T))
        self.wd = cosine(o.weight_decay, o.weight_decay_end, T)
        self.momentum = cosine(o.momentum_teacher, o.momentum_teacher_end, T)
        self.t_temp = teacher_temperature(dn.teacher_temp, dn.warmup_teacher_temp,
                                          int(dn.warmup_teacher_temp_epochs * T), T)
        self.freeze_last = int(o.freeze_last_layer * T)
        self.gram_start = int(cfg.gram.start * T)
        self.gram_every = int(cfg.gram.refresh_every * T)
        self.last_row: dict[str, float] = {}
        self.monitor_values: dict[str, torch.Tensor] = {}  # this step's collapse-monitor figures (monitor.py)
        temp_warmup = int(dn.warmup_teacher_temp_epochs * T) if dn.warmup_teacher_temp != dn.teacher_temp else 0
        self.monitor = CollapseMonitor(K, burn_in_steps(T, int(o.warmup * T), temp_warmup), T)

    def _fused(self, encoder: ViTBackbone) -> bool:
        """``optim.fused`` where it applies: a supported backbone whose parameters are whole on this process."""
        d = self.cfg.distributed
        sharded = self.env.world > 1 and (d.strategy == "fsdp" or (d.strategy == "deepspeed" and d.zero_stage == 3))
        return self.cfg.optim.fused and not sharded and fused.supported(encoder)

    def attach(self, runner: D.Runner) -> None:
        """The runner the student trains through (DDP / FSDP / DeepSpeed wrap it in place)."""
        self.runner = runner

    @property
    def dino_targets(self) -> bool:
        """The teacher gives DINO/iBOT targets (an EMA teacher, or a DINO-MX distillation teacher)."""
        return self.distill_teacher is None or self.distill_mode == "dino"

    # -- distillation teacher -----------------------------------------------------------------
    def _distill_teacher(self) -> tuple[SSLModel | None, int | None]:
        src = self.cfg.strategy.distill.teacher
        if not src:
            return None, None
        path = backbone_dir(src)
        t_enc = ViTBackbone(create_model(str(path) if path else src, self.in_chans, self.cfg.model.channel_init),
                            pooling="cls")
        heads = (path / HEADS_FILE) if path else None
        mode = self.cfg.strategy.distill.loss
        if mode == "auto":
            mode = "dino" if heads is not None and heads.is_file() else "feature"
        self.distill_mode = mode
        if mode == "feature":
            teacher = SSLModel(t_enc, self.cfg.head)  # heads unused in feature mode
            return teacher.to(self.env.device), t_enc.hidden_size
        if heads is None or not heads.is_file():
            raise ConfigError(f"strategy.distill.loss=dino needs a teacher with DINO-MX heads ({HEADS_FILE}); "
                              f"{src} has none. Use strategy.distill.loss=feature")
        hcfg = json.loads((path / HEADS_CONFIG).read_text())
        head = HeadConfig(**{**hcfg["head"], "ibot_separate_head": hcfg["ibot_separate_head"]})
        if head.out_dim != self.cfg.head.out_dim:
            raise ConfigError(f"the teacher's heads have {head.out_dim} prototypes; set head.out_dim={head.out_dim} "
                              "for the student")
        teacher = SSLModel(t_enc, head)
        state = load_file(heads)
        teacher.dino_head.load_state_dict({k[len("dino_head."):]: v for k, v in state.items()
                                           if k.startswith("dino_head.")})
        if teacher.ibot_head is not None:
            teacher.ibot_head.load_state_dict({k[len("ibot_head."):]: v for k, v in state.items()
                                               if k.startswith("ibot_head.")})
        return teacher.to(self.env.device), None

    # -- one step -----------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        epoch, it = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.data.images.shape[0], generator=step_generator(self.cfg.seed, epoch, 1))
        idx = perm[it * self.batch:(it + 1) * self.batch]
        return idx[self.offset:self.offset + self.local_batch]

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        cfg, seed, dev = self.cfg, self.cfg.seed, self.env.device
        torch.manual_seed(module_seed(seed, step, self.env.rank))  # this process's stochastic depth / dropout
        idx = self.batch_indices(step)
        g = step_generator(seed, step, 2)
        regions = self.data.regions[idx] if self.data.regions is not None else None
        crops = self.crops(self.data.images[idx], g, self.offset, self.batch, regions)
        b = self.local_batch
        masks = None
        if cfg.ibot.loss_weight > 0 and self.dino_targets:
            all_masks = batch_masks(2 * self.batch, self.grid, cfg.ibot.mask_probability, cfg.ibot.mask_ratio,
                                    step_generator(seed, step, 3))
            # crop-major rows: [crop 1 of images 0..B-1, crop 2 of images 0..B-1]; take this process's rows
            masks = all_masks.view(2, self.batch, -1)[:, self.offset:self.offset + b].reshape(2 * b, -1).to(dev)
        gl = crops.globals.to(dev)
        lo = crops.locals.to(dev) if crops.locals is not None else None
        t_temp = float(self.t_temp[step])
        with torch.autocast(dev.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            with torch.no_grad():
                t_cls, t_patches = self.teacher.encode(gl, patches=self.teacher_patches)
                t_z = self.teacher.dino_head.bottleneck(t_cls)
                t_dino = self.teacher.dino_head.prototypes(t_z)
                t_ibot = (self.teacher.ibot_head or self.teacher.dino_head)(t_patches[masks]) \
                    if masks is not None else None
                anchor = self.gram_anchor.encoder.encode(gl)[1] if self.gram_anchor is not None else None
            out = self.runner.module(gl, lo, masks)
        ctx = StepTensors(out, t_cls, t_patches, t_dino, t_z, t_ibot, masks, anchor, t_temp, b)
        terms = {}
        for name, (weight_of, compute) in LOSS_TERMS.items():
            w = weight_of(self)
            if w > 0:
                value = compute(self, ctx)
                if value is not None:
                    terms[name] = (w, value)
        loss = sum(w * v for w, v in terms.values())
        result = {name: v for name, (_, v) in terms.items()}
        result["loss"] = loss
        self.last_row = {"teacher_temp": t_temp, "momentum": float(self.momentum[step]), "lr": float(self.lr[step])}
        self.monitor_values = self._monitor(ctx)
        return result

    def _monitor(self, c: StepTensors) -> dict[str, torch.Tensor]:
        """The collapse monitor's figures (monitor.py) for the model the run saves."""
        dino = self.dino_targets and self.cfg.dino.loss_weight > 0
        if self.distill_teacher is None:  # the EMA teacher is what the run saves
            feats, cls = (c.t_bottleneck if dino else None), c.t_cls
        else:
            feats, cls = None, c.student["cls"].detach()
        return step_figures(c.t_dino_probs, c.student["dino_global"].detach() if dino else None,
                            self.cfg.dino.student_temp, feats, cls)

    def before_update(self, step: int) -> None:
        if step < self.freeze_last:  # DINO's last-layer freeze: the prototypes move once the rest has settled
            self.runner.drop_grads([p for h in self.runner.inner.heads() for p in h.last_layer_parameters()])

    def after_update(self, step: int) -> None:
        if self.distill_teacher is None:
            self.runner.ema_into(self.teacher, float(self.momentum[step]))
        self._maybe_refresh_anchor(step + 1)

    def _maybe_refresh_anchor(self, done: int) -> None:
        if self.cfg.gram.loss_weight <= 0 or done < self.gram_start:
            return
        due = done == self.gram_start or (self.gram_every > 0 and (done - self.gram_start) % self.gram_every == 0)
        if due or self.gram_anchor is None:
            self.gram_anchor = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer a resumed run needs (collective under sharded strategies)."""
        return {"student": self.runner.model_state(), "teacher": self.teacher.state_dict(),
                "gram_anchor": self.gram_anchor.state_dict() if self.gram_anchor is not None else None,
                "dino_center": self.dino_loss.center.cpu(), "ibot_center": self.ibot_loss.center.cpu()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.runner.load_model_state(st["student"])
        self.teacher.load_state_dict(st["teacher"])
        if st["gram_anchor"] is not None:
            self.gram_anchor = copy.deepcopy(self.teacher)
            self.gram_anchor.load_state_dict(st["gram_anchor"])
            self.gram_anchor.requires_grad_(False).eval()
        self.dino_loss.center.copy_(st["dino_center"])
        self.ibot_loss.center.copy_(st["ibot_center"])

    def saved_model(self) -> SSLModel:
        """The model whose backbone and heads a run saves: the EMA teacher (as DINO does), else the student."""
        return self.student if self.distill_teacher is not None else self.teacher

    def save_backbone(self, out: Path) -> dict[str, Any]:
        """Backbone in HF format (``out/backbone``) with its heads; returns the preprocessing it expects."""
        cfg = self.cfg
        mean, std = self.prep.mean, self.prep.std
        src = self.saved_model()
        enc = copy.deepcopy(src.encoder).cpu()
        enc.save_pretrained(out / "backbone", mean, std, cfg.crops.global_size)
        heads = {}
        for name in ("dino_head", "ibot_head"):
            h = getattr(src, name)
            if h is not None:
                heads.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in h.state_dict().items()})
        return {"mean": mean, "std": std, "in_chans": self.in_chans, "input_size": cfg.crops.global_size,
                "heads": heads, "heads_config": {"head": _head_dict(cfg.head), "ibot_separate_head":
                                                 src.ibot_head is not None}}


def _head_dict(h: HeadConfig) -> dict[str, Any]:
    return {"out_dim": h.out_dim, "hidden_dim": h.hidden_dim, "bottleneck_dim": h.bottleneck_dim,
            "nlayers": h.nlayers, "norm_last_layer": h.norm_last_layer, "ibot_separate_head": h.ibot_separate_head}


# ----------------------------------------------------------------------------------------- loss terms


def _dino(task: DinoTask, c: StepTensors) -> torch.Tensor | None:
    if not task.dino_targets:
        return None
    t_probs = task.dino_loss.teacher_probs(c.t_dino.view(2, c.b, -1), c.teacher_temp)
    c.t_dino_probs = t_probs
    s_all = c.student["dino_global"].view(2, c.b, -1)
    if c.student["dino_local"] is not None:
        s_all = torch.cat([s_all, c.student["dino_local"].view(-1, c.b, s_all.shape[-1])])
    return task.dino_loss(s_all, t_probs)


def _ibot(task: DinoTask, c: StepTensors) -> torch.Tensor | None:
    if c.masks is None:
        return None
    t_pp = task.ibot_loss.teacher_probs(c.t_ibot, c.teacher_temp)
    per_image = c.masks.sum(dim=1, keepdim=True).expand_as(c.masks)[c.masks].float()
    return task.ibot_loss(c.student["ibot"], t_pp, 1.0 / per_image, 2 * c.b)


def _koleo(task: DinoTask, c: StepTensors) -> torch.Tensor:
    # Summed over the two global crops, as DINOv2 / DINOv3 do (``sum(koleo(p) for p in cls.chunk(2))``),
    # so koleo.loss_weight means what it means there.
    cls = c.student["cls"].view(2, c.b, -1)
    return sum(task.koleo(cls[i], D.all_gather_with_grad(cls[i], task.env), task.offset) for i in range(2))


def _gram(task: DinoTask, c: StepTensors) -> torch.Tensor | None:
    return task.gram(c.student["patches"], c.anchor) if c.anchor is not None else None


def _distill(task: DinoTask, c: StepTensors) -> torch.Tensor | None:
    if task.dino_targets:
        return None
    return task.feature_distill(c.student["proj_cls"], c.student["proj_patches"], c.t_cls, c.t_patches)


# name -> (its weight in the total loss, how it is computed from a step's tensors; None = not this step)
LOSS_TERMS: dict[str, tuple[Callable[[DinoTask], float], Callable[[DinoTask, StepTensors], torch.Tensor | None]]] = {
    "dino": (lambda t: t.cfg.dino.loss_weight, _dino),
    "distill": (lambda t: 1.0 if t.distill_teacher is not None else 0.0, _distill),
    "ibot": (lambda t: t.cfg.ibot.loss_weight, _ibot),
    "koleo": (lambda t: t.cfg.koleo.loss_weight, _koleo),
    "gram": (lambda t: t.cfg.gram.loss_weight, _gram),
}


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
