"""The DINO-MX pretraining loop: config in, HF backbone + heads + metrics out, resumable at any checkpoint.

Every random draw of step ``s`` (batch order, crops, masks, stochastic depth) comes from generators
seeded with ``(seed, s)``, and the checkpoint holds everything else (student, teacher, Gram anchor,
optimizer, loss centers, step). A run killed at any point and restarted with the same command
therefore continues exactly where the last checkpoint left it, and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training import distributed as D
from training.config import ConfigError
from training.dinomx.backbones import Encoder, count_parameters, create_model, save_backbone
from training.dinomx.crops import CropConfig, MultiCrop
from training.dinomx.losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss
from training.dinomx.masking import batch_masks
from training.dinomx.model import (
    SSLModel,
    apply_lora,
    base_model,
    cosine,
    freeze,
    param_groups,
    peak_memory_mb,
    teacher_temperature,
)
from training.loop import amp_dtype
from zoo import store
from zoo.data import dataset_info, load_split, per_channel

HEADS_FILE = "dinomx_heads.safetensors"


@dataclass
class PretrainData:
    """Training images (N, C, H, W) uint8, with optional regions (N, 4) x0,y0,x1,y1 (NaN = none)."""

    images: torch.Tensor
    regions: torch.Tensor | None = None
    names: tuple[str, ...] = ()


def _to_channels(x: torch.Tensor, c: int, flag: str) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, c, -1, -1).contiguous()
    if c == 1 and x.shape[1] == 3:  # luminance (ITU-R 601), as PIL's "L"
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ConfigError(f"{flag} has {x.shape[1]} channels; the backbone takes {c}. Set model.in_chans to match")


def load_data(cfg: dict[str, Any], in_chans: int) -> PretrainData:
    """The pooled training splits of ``data.datasets``, converted to ``in_chans`` channels."""
    d = cfg["data"]
    flags = d["datasets"]
    if isinstance(flags, str):
        flags = [flags]
    if not flags:
        raise ConfigError("data.datasets is empty; name at least one MedMNIST flag, e.g. data.datasets=[bloodmnist]")
    parts = []
    for flag in flags:
        dataset_info(flag)
        s = load_split(flag, "train", size=int(d["size"]), root=d["root"], download=d["download"])
        parts.append(_to_channels(s.images, in_chans, flag))
    sizes = {p.shape[-1] for p in parts}
    if len(sizes) > 1:
        raise ConfigError(f"data.datasets have different image sizes {sorted(sizes)}; pool datasets of one size")
    images = torch.cat(parts)
    regions = None
    if d["regions"]:
        arr = np.load(d["regions"])
        if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] != images.shape[0]:
            raise ConfigError(f"data.regions {d['regions']} must hold an ({images.shape[0]}, 4) array of boxes "
                              f"x0,y0,x1,y1 (NaN rows for none), got {arr.shape}")
        regions = torch.from_numpy(arr.astype(np.float32))
    if int(d["max_images"]) > 0:
        images = images[: int(d["max_images"])]
        regions = regions[: int(d["max_images"])] if regions is not None else None
    return PretrainData(images, regions, tuple(flags))


def data_channels(cfg: dict[str, Any]) -> int:
    want = cfg["model"]["in_chans"]
    if want not in ("auto", None):
        return int(want)
    flags = cfg["data"]["datasets"] if not isinstance(cfg["data"]["datasets"], str) else [cfg["data"]["datasets"]]
    chans = {dataset_info(f).n_channels for f in flags}
    return max(chans)  # grey sets pooled with RGB sets are replicated to RGB


def _gen(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 97 + stream) % (2**63))


def _save_atomic(obj: Any, path: Path) -> None:
    store.write_atomic(path, lambda p: torch.save(obj, p))


class Pretrainer:
    """Holds the run's state; :meth:`fit` trains, :meth:`save` writes the outputs."""

    def __init__(self, cfg: dict[str, Any], data: PretrainData | None = None, env: D.DistEnv | None = None):
        self.cfg = cfg
        self.env = env or D.init(cfg["distributed"]["strategy"], cfg["distributed"]["backend"])
        m, o = cfg["model"], cfg["optim"]
        self.in_chans = data.images.shape[1] if data is not None else data_channels(cfg)
        self.data = data or load_data(cfg, self.in_chans)
        n = self.data.images.shape[0]
        self.batch = int(o["batch_size"])
        if n < self.batch:
            raise ConfigError(f"{n} training images is fewer than optim.batch_size={self.batch}; lower the batch")
        self.offset, self.local_batch = self.env.shard(self.batch)
        self.steps_per_epoch = n // self.batch
        self.total = int(o["steps"]) if int(o["steps"]) > 0 else int(float(o["epochs"]) * self.steps_per_epoch)
        if self.total < 1:
            raise ConfigError("the run has no steps; raise optim.epochs or optim.steps")
        seed = int(cfg["seed"])
        torch.manual_seed(seed)

        encoder = Encoder(create_model(m["backbone"], self.in_chans, m["channel_init"], m["revision"],
                                       float(m["drop_path"]), int(cfg["crops"]["global_size"])))
        s = cfg["strategy"]
        self.distill_mode = "dino"
        self.distill_teacher, distill_dim = self._distill_teacher(encoder)
        if s["freeze"]["blocks"] or s["freeze"]["patch_embed"]:
            freeze(encoder, int(s["freeze"]["blocks"]), bool(s["freeze"]["patch_embed"]))
        if s["lora"]["enabled"]:
            apply_lora(encoder, int(s["lora"]["r"]), int(s["lora"]["alpha"]), float(s["lora"]["dropout"]),
                       s["lora"]["targets"])
        self.student = SSLModel(encoder, cfg["head"], bool(cfg["head"]["ibot_separate_head"]), distill_dim)
        self.student.to(self.env.device)
        if self.distill_teacher is not None:
            self.teacher = self.distill_teacher
        else:
            self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False).eval()
        self.gram_anchor: SSLModel | None = None
        self.params = count_parameters(self.student)
        self.params["backbone_trainable"] = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        self.params["backbone_total"] = sum(p.numel() for p in encoder.parameters())

        K = int(cfg["head"]["out_dim"])
        dn, ib = cfg["dino"], cfg["ibot"]
        self.dino_loss = DINOLoss(K, dn["student_temp"], dn["center_momentum"], dn["centering"]).to(self.env.device)
        self.ibot_loss = IBOTPatchLoss(K, dn["student_temp"], dn["center_momentum"], ib["centering"]).to(
            self.env.device)
        self.koleo = KoLeoLoss()
        self.gram = GramLoss()
        c = cfg["crops"]
        ch = self.in_chans
        self.crops = MultiCrop(CropConfig(
            global_size=int(c["global_size"]), global_scale=tuple(c["global_scale"]),
            local_number=int(c["local_number"]), local_size=int(c["local_size"]), local_scale=tuple(c["local_scale"]),
            flip=float(c["flip"]), color_jitter=float(c["color_jitter"]), brightness=float(c["brightness"]),
            contrast=float(c["contrast"]), saturation=float(c["saturation"]), grayscale=float(c["grayscale"]),
            blur=tuple(c["blur"]), solarize=tuple(c["solarize"]), blur_sigma=tuple(c["blur_sigma"]),
            label_guided=float(c["label_guided"]),
            mean=tuple(per_channel(cfg["data"]["mean"], ch)), std=tuple(per_channel(cfg["data"]["std"], ch))))
        self.grid = encoder.grid(int(c["global_size"]))

        T = self.total
        self.lr = cosine(float(o["lr"]), float(o["min_lr"]), T, int(float(o["warmup"]) * T))
        self.wd = cosine(float(o["weight_decay"]), float(o["weight_decay_end"]), T)
        self.momentum = cosine(float(o["momentum_teacher"]), float(o["momentum_teacher_end"]), T)
        self.t_temp = teacher_temperature(float(dn["teacher_temp"]), float(dn["warmup_teacher_temp"]),
                                          int(float(dn["warmup_teacher_temp_epochs"]) * T), T)
        self.freeze_last = int(float(o["freeze_last_layer"]) * T)
        g = cfg["gram"]
        self.gram_start = int(float(g["start"]) * T)
        self.gram_every = int(float(g["refresh_every"]) * T)
        self.dtype = amp_dtype(o["amp"], self.env.device)

        layer_decay = float(o["layer_decay"])
        self.runner = D.wrap(self.env, self.student,
                             lambda groups: torch.optim.AdamW(groups, lr=float(o["lr"]), betas=(0.9, 0.999)),
                             lambda mod: param_groups(mod, layer_decay), cfg)
        if o.get("compile"):
            self.runner.module = torch.compile(self.runner.module)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.images_seen = 0

    # -- distillation -------------------------------------------------------------------------
    def _distill_teacher(self, encoder: Encoder) -> tuple[SSLModel | None, int | None]:
        src = self.cfg["strategy"]["distill"]["teacher"]
        if not src:
            return None, None
        path = resolve_backbone_dir(src)
        t_enc = Encoder(create_model(str(path) if path else src, self.in_chans, self.cfg["model"]["channel_init"]))
        heads = (path / HEADS_FILE) if path else None
        mode = self.cfg["strategy"]["distill"]["loss"]
        if mode == "auto":
            mode = "dino" if heads is not None and heads.is_file() else "feature"
        self.distill_mode = mode
        if mode == "dino":
            if heads is None or not heads.is_file():
                raise ConfigError(f"strategy.distill.loss=dino needs a teacher with DINO-MX heads ({HEADS_FILE}); "
                                  f"{src} has none. Use strategy.distill.loss=feature")
            hcfg = json.loads((path / "dinomx_heads.json").read_text())
            teacher = SSLModel(t_enc, hcfg["head"], hcfg["ibot_separate_head"])
            state = load_file(heads)
            teacher.dino_head.load_state_dict({k[len("dino_head."):]: v for k, v in state.items()
                                               if k.startswith("dino_head.")})
            if teacher.ibot_head is not None:
                teacher.ibot_head.load_state_dict({k[len("ibot_head."):]: v for k, v in state.items()
                                                   if k.startswith("ibot_head.")})
            if int(hcfg["head"]["out_dim"]) != int(self.cfg["head"]["out_dim"]):
                raise ConfigError(f"the teacher's heads have {hcfg['head']['out_dim']} prototypes; set "
                                  f"head.out_dim={hcfg['head']['out_dim']} for the student")
            return teacher.to(self.env.device), None
        if mode != "feature":
            raise ConfigError(f"strategy.distill.loss must be auto, dino or feature, got {mode!r}")
        teacher = SSLModel(t_enc, self.cfg["head"])  # heads unused in feature mode
        return teacher.to(self.env.device), t_enc.embed_dim

    # -- one step -----------------------------------------------------------------------------
    def _batch_indices(self, step: int) -> torch.Tensor:
        epoch, it = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.data.images.shape[0], generator=_gen(int(self.cfg["seed"]), epoch, 1))
        idx = perm[it * self.batch:(it + 1) * self.batch]
        return idx[self.offset:self.offset + self.local_batch]

    def _set_schedules(self, step: int) -> None:
        for grp in self.runner.optimizer.param_groups:
            grp["lr"] = float(self.lr[step]) * grp.get("lr_scale", 1.0)
            grp["weight_decay"] = float(self.wd[step]) if grp.get("wd_on", True) else 0.0

    def train_step(self, step: int) -> dict[str, float]:
        cfg, seed, dev = self.cfg, int(self.cfg["seed"]), self.env.device
        torch.manual_seed(seed * 1_000_003 + step)  # stochastic depth / dropout draws of this step
        idx = self._batch_indices(step)
        g = _gen(seed, step, 2)
        regions = self.data.regions[idx] if self.data.regions is not None else None
        crops = self.crops(self.data.images[idx], g, self.offset, self.batch, regions)
        b = self.local_batch
        masks = None
        if float(cfg["ibot"]["loss_weight"]) > 0 and self.distill_mode_is_dino():
            all_masks = batch_masks(2 * self.batch, self.grid, float(cfg["ibot"]["mask_probability"]),
                                    tuple(cfg["ibot"]["mask_ratio"]), _gen(seed, step, 3))
            # crop-major rows: [crop 1 of images 0..B-1, crop 2 of images 0..B-1]; take this process's rows
            all_masks = all_masks.view(2, self.batch, -1)[:, self.offset:self.offset + b].reshape(2 * b, -1)
            masks = all_masks.to(dev)
        gl = crops.globals.to(dev)
        lo = crops.locals.to(dev) if crops.locals is not None else None
        self._set_schedules(step)
        t_temp = float(self.t_temp[step])
        with torch.autocast(dev.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            with torch.no_grad():
                t_cls, t_patches = self.teacher.encoder(gl)
                t_dino = self.teacher.dino_head(t_cls)
                t_ibot = (self.teacher.ibot_head or self.teacher.dino_head)(t_patches[masks]) \
                    if masks is not None else None
                anchor = self.gram_anchor.encoder(gl)[1] if self.gram_anchor is not None else None
            out = self.runner.module(gl, lo, masks)
        losses = self._losses(out, t_cls, t_patches, t_dino, t_ibot, masks, anchor, t_temp, b)
        loss = sum(w * v for w, v in losses.values() if w > 0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}; lower optim.lr or raise "
                                     "dino.warmup_teacher_temp_epochs")
        self.runner.zero_grad()
        self.runner.backward(loss)
        grad_norm = self.runner.clip_grad(float(cfg["optim"]["clip_grad"]))
        if step < self.freeze_last:
            self.runner.drop_grads([p for h in self.runner.inner.heads() for p in h.last_layer_parameters()])
        self.runner.step()
        if self.distill_teacher is None:
            self.runner.ema_into(self.teacher, float(self.momentum[step]))
        self._maybe_refresh_anchor(step + 1)
        row = D.average({**{k: v for k, (_, v) in losses.items()}, "loss": loss}, self.env)  # global-batch values
        row.update(teacher_temp=t_temp, momentum=float(self.momentum[step]),
                   lr=float(self.lr[step]), grad_norm=grad_norm)
        return row

    def distill_mode_is_dino(self) -> bool:
        return self.distill_teacher is None or self.distill_mode == "dino"

    def _losses(self, out, t_cls, t_patches, t_dino, t_ibot, masks, anchor, t_temp, b
                ) -> dict[str, tuple[float, torch.Tensor]]:
        cfg = self.cfg
        losses: dict[str, tuple[float, torch.Tensor]] = {}
        if not self.distill_mode_is_dino():  # feature distillation from a teacher without DINO-MX heads
            cos_cls = 1 - F.cosine_similarity(out["proj_cls"].float(), t_cls.float(), dim=-1).mean()
            sp = _match_grid(out["proj_patches"].float(), t_patches.shape[1])
            cos_patch = 1 - F.cosine_similarity(sp, t_patches.float(), dim=-1).mean()
            losses["distill"] = (1.0, cos_cls + cos_patch)
        else:
            t_probs = self.dino_loss.teacher_probs(t_dino.view(2, b, -1), t_temp)
            s_all = out["dino_global"].view(2, b, -1)
            if out["dino_local"] is not None:
                s_all = torch.cat([s_all, out["dino_local"].view(-1, b, s_all.shape[-1])])
            losses["dino"] = (float(cfg["dino"]["loss_weight"]), self.dino_loss(s_all, t_probs))
            if masks is not None:
                t_pp = self.ibot_loss.teacher_probs(t_ibot, t_temp)
                per_image = masks.sum(dim=1, keepdim=True).expand_as(masks)[masks].float()
                losses["ibot"] = (float(cfg["ibot"]["loss_weight"]),
                                  self.ibot_loss(out["ibot"], t_pp, 1.0 / per_image, 2 * b))
        kw = float(cfg["koleo"]["loss_weight"])
        if kw > 0:
            cls = out["cls"].view(2, b, -1)
            k = sum(self.koleo(cls[i], D.all_gather_with_grad(cls[i], self.env), self.offset) for i in range(2)) / 2
            losses["koleo"] = (kw, k)
        if anchor is not None:
            losses["gram"] = (float(cfg["gram"]["loss_weight"]), self.gram(out["patches"], anchor))
        return losses

    def _maybe_refresh_anchor(self, done: int) -> None:
        if float(self.cfg["gram"]["loss_weight"]) <= 0 or done < self.gram_start:
            return
        due = done == self.gram_start or (self.gram_every > 0 and (done - self.gram_start) % self.gram_every == 0)
        if due or self.gram_anchor is None:
            self.gram_anchor = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "student": self.runner.model_state(), "teacher": self.teacher.state_dict(),
                "gram_anchor": self.gram_anchor.state_dict() if self.gram_anchor is not None else None,
                "optimizer": self.runner.optimizer_state(), "dino_center": self.dino_loss.center.cpu(),
                "ibot_center": self.ibot_loss.center.cpu(), "history": self.history, "seconds": self.seconds,
                "images_seen": self.images_seen, "config_sha": config_sha(self.cfg)}

    def load_state(self, st: dict[str, Any]) -> None:
        if st["config_sha"] != config_sha(self.cfg):
            raise ConfigError("the checkpoint was written by a run with another config; delete it or set "
                              "checkpoint.resume=false (or use another run_name)")
        self.runner.load_model_state(st["student"])
        self.teacher.load_state_dict(st["teacher"])
        if st["gram_anchor"] is not None:
            self.gram_anchor = copy.deepcopy(self.teacher)
            self.gram_anchor.load_state_dict(st["gram_anchor"])
            self.gram_anchor.requires_grad_(False).eval()
        self.runner.load_optimizer_state(st["optimizer"])
        self.dino_loss.center.copy_(st["dino_center"])
        self.ibot_loss.center.copy_(st["ibot_center"])
        self.step, self.history = int(st["step"]), list(st["history"])
        self.seconds, self.images_seen = float(st["seconds"]), int(st["images_seen"])

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        st = self.state()  # collective under sharded strategies: every process builds it
        if self.env.is_main:
            _save_atomic(st, ckpt_dir / "last.pt")
        D.barrier(self.env)

    def try_resume(self, ckpt_dir: Path) -> bool:
        p = ckpt_dir / "last.pt"
        if not (self.cfg["checkpoint"]["resume"] and p.is_file()):
            return False
        self.load_state(torch.load(p, map_location="cpu", weights_only=True))
        return True

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, ckpt_dir: Path | None = None, progress: bool = True, stop_after: int | None = None) -> None:
        every = int(self.cfg["checkpoint"]["every"])
        log_every = max(1, int(self.cfg["log"]["every"]))
        if self.device_is_cuda():
            torch.cuda.reset_peak_memory_stats(self.env.device)
        bar = tqdm(total=self.total, initial=self.step, desc="dinomx", unit="step",
                   disable=not (progress and self.env.is_main))
        self.runner.module.train()
        while self.step < self.total:
            t0 = time.perf_counter()
            row = self.train_step(self.step)
            self.seconds += time.perf_counter() - t0
            self.images_seen += self.batch
            self.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "dino", "ibot", "koleo", "gram", "distill")
                             if k in row} | {"t_temp": f"{row['teacher_temp']:.3f}", "mom": f"{row['momentum']:.4f}"})
            if self.step % log_every == 0 or self.step == self.total:
                self.history.append({"step": self.step, **{k: round(v, 6) for k, v in row.items()},
                                     "seconds": round(self.seconds, 2)})
            if ckpt_dir is not None and every > 0 and (self.step % every == 0 or self.step == self.total):
                self.save_checkpoint(ckpt_dir)
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        self.runner.module.eval()

    def device_is_cuda(self) -> bool:
        return self.env.device.type == "cuda"

    def report(self) -> dict[str, Any]:
        return {"parameters": self.params, "peak_memory_mb": round(peak_memory_mb(self.env.device), 1),
                "images_per_s": round(self.images_seen / self.seconds, 2) if self.seconds else None,
                "steps": self.step, "train_seconds": round(self.seconds, 2), "world_size": self.env.world,
                "strategy": self.env.strategy, "device": str(self.env.device)}

    def save_outputs(self, out: Path) -> dict[str, Any]:
        """Backbone in HF format (``out/backbone``) from the EMA teacher (as DINO does), plus its heads."""
        cfg = self.cfg
        mean = tuple(per_channel(cfg["data"]["mean"], self.in_chans))
        std = tuple(per_channel(cfg["data"]["std"], self.in_chans))
        src = self.student if self.distill_teacher is not None else self.teacher
        enc = copy.deepcopy(src.encoder).cpu()
        save_backbone(base_model(enc) if not _is_peft(enc.model) else enc.model, out / "backbone", mean, std,
                      int(cfg["crops"]["global_size"]))
        heads = {}
        for name in ("dino_head", "ibot_head"):
            h = getattr(src, name)
            if h is not None:
                heads.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in h.state_dict().items()})
        save_file(heads, out / "backbone" / HEADS_FILE)
        (out / "backbone" / "dinomx_heads.json").write_text(json.dumps(
            {"head": cfg["head"], "ibot_separate_head": src.ibot_head is not None}, indent=2) + "\n")
        return {"mean": mean, "std": std, "in_chans": self.in_chans, "input_size": int(cfg["crops"]["global_size"])}


def _match_grid(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) patch tokens on a sqrt(N) grid -> (B, n, D) on a sqrt(n) grid (bilinear), for teachers
    whose patch size differs from the student's."""
    if tokens.shape[1] == n:
        return tokens
    b, m, d = tokens.shape
    g, h = math.isqrt(m), math.isqrt(n)
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)
    return F.interpolate(grid, size=(h, h), mode="bilinear", align_corners=False).reshape(b, d, n).transpose(1, 2)


def _is_peft(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "peft"


def config_sha(cfg: dict[str, Any]) -> str:
    """What must match for a checkpoint to continue a run (progress/log/eval settings may change)."""
    c = {k: v for k, v in cfg.items() if k not in ("log", "eval", "checkpoint", "run_name", "output_dir")}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_backbone_dir(src: str) -> Path | None:
    """A DINO-MX output (run or entry folder, or its ``backbone/``), a built zoo entry, or None (hub id)."""
    p = Path(src).expanduser()
    if (p / "backbone" / "config.json").is_file():
        return p / "backbone"
    if (p / "config.json").is_file():
        return p
    from zoo.registry import registry

    if src in registry():
        d = store.entry_dir(src)
        if not (d / "backbone" / "config.json").is_file():
            raise ConfigError(f"{src} is not built (or has no backbone); build it with `zoo build {src}`")
        return d / "backbone"
    return None


def run(cfg: dict[str, Any], out: Path, ckpt_dir: Path, progress: bool = True, data: PretrainData | None = None,
        entry=None, stop_after: int | None = None) -> dict[str, Any] | None:
    """Pretrain as ``cfg`` says, resuming from ``ckpt_dir``; write outputs into ``out`` (main process).

    Returns the metrics (main process) or None (other processes, or when stopped early by ``stop_after``).
    """
    from training.dinomx.evaluate import evaluate_backbone

    t_start = time.perf_counter()
    cfg = json.loads(json.dumps(cfg))
    progress = progress and bool(cfg["log"]["progress"])
    pt = Pretrainer(cfg, data)
    resumed = pt.try_resume(ckpt_dir)
    if resumed and pt.env.is_main and progress:
        print(f"resuming from {ckpt_dir / 'last.pt'} at step {pt.step}/{pt.total}", flush=True)
    pt.fit(ckpt_dir, progress, stop_after)
    if pt.step < pt.total:
        return None
    report = pt.report()
    if not pt.env.is_main:
        D.barrier(pt.env)
        return None
    out.mkdir(parents=True, exist_ok=True)
    prep = pt.save_outputs(out)
    ev = evaluate_backbone(out / "backbone", cfg, prep, progress=progress) if data is None else {}
    from zoo.registry import ZooEntry

    flags = pt.data.names
    lineage = {"backbone_source": cfg["model"]["backbone"], "datasets": list(flags),
               "distill_teacher": cfg["strategy"]["distill"]["teacher"], "resumed": resumed}
    e = entry
    if e is not None:  # the entry records the preprocessing the run actually used
        import dataclasses

        e = dataclasses.replace(e, in_chans=prep["in_chans"], input_size=prep["input_size"], mean=prep["mean"],
                                std=prep["std"])
    if e is None and flags:
        info = dataset_info(flags[0])
        e = ZooEntry(name=cfg["run_name"] or f"dinomx-{cfg['model']['backbone']}-{'+'.join(flags)}", method="dinomx",
                     arch=str(cfg["model"]["backbone"]), dataset=flags[0], task=info.task, labels=info.labels,
                     in_chans=prep["in_chans"], input_size=prep["input_size"], mean=prep["mean"], std=prep["std"],
                     recipe="dinomx/default.yaml", license=info.license)
    sha = {str(p.relative_to(out)): store.sha256_file(p) for p in store.weight_files(out)}
    config = {"format": 1, "entry": e.to_dict() if e is not None else None, "config": cfg, "sha256": sha,
              "lineage": lineage, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    store.write_json_atomic(out / "config.json", config)
    from training.config import dump_config

    (out / "config.yaml").write_text(dump_config(cfg))
    metrics = {**ev, "report": report, "seed": int(cfg["seed"]), "history": pt.history,
               "wall_time_s": round(time.perf_counter() - t_start, 2)}
    store.write_json_atomic(out / "metrics.json", metrics)
    if e is not None:
        from training.dinomx.card import render_card

        (out / "README.md").write_text(render_card(e, config, metrics))
    D.barrier(pt.env)
    return metrics

