"""Training-step throughput: a DINO-MX step next to lightly's DINO on the same backbone, crops, batch and precision.

Both sides train the same transformers ViT (``--backbone``, CLS token through
``zoo.backbones.ViTBackbone``, same seed so the same initial weights) with DINO heads of the
same sizes (``head.*`` of the DINO-MX config), the same optimizer (AdamW, same lr and weight decay),
gradient clipping at ``optim.clip_grad``, an EMA teacher with a cosine momentum schedule and a
linear teacher-temperature warm-up.

- **DINO-MX**: ``training.dinomx.recipe.Pretraining`` with the ``dinomx/dino.yaml`` preset (DINO loss
  with centering; no iBOT, KoLeo or Gram), one step of its training loop per step. Its backbone
  runs through :mod:`training.dinomx.fused` (one QKV matmul per block, fused attention on CUDA and
  the explicit form on the CPU, and in
  the last block only the CLS row, the one token the DINO loss reads: the same weights and math as
  the transformers forward, to rounding), global and local crops in one batch each, the DINO head
  once on all of them. ``--compile`` adds a row of the same step under ``torch.compile``
  (``optim.compile=true``; its compilation is in the untimed warm-up). ``--stream`` adds, at bf16,
  rows with ``optim.low_precision_stream=true``: the blocks' residual stream in bf16 as DINOv2's
  FSDP mixed precision computes it, where autocast (and lightly's side) goes back to float32 after
  every matmul; master weights and optimizer state stay float32 on every side. ``--dinov2`` adds a row with
  the full DINOv2-style step (``dinomx/dinov2.yaml``: Sinkhorn-Knopp, iBOT masked patches with a
  separate head, KoLeo), which does more work per image than lightly's DINO.
- **lightly**: ``lightly==1.6.0`` built as its DINO example does: ``DINOProjectionHead`` on the
  backbone, ``deactivate_requires_grad`` on a copied teacher, ``DINOLoss`` over lists of views
  (each view forwarded on its own, as in the example), ``update_momentum`` with
  ``cosine_schedule``, ``cancel_last_layer_gradients``. Like DINO-MX (and DINO), its teacher sees
  the global views only. ``--lightly-fused`` adds a row of lightly's step on DINO-MX's fused
  backbone forward, which separates what the backbone kernels give from what the trainer does.

Crops: for every step, one ``MultiCrop`` call (the DINO-MX crop settings) makes the 2 global and
``crops.local_number`` local crops of one batch, outside the timed region, and every side trains on
those same tensors; augmentation cost is therefore *excluded from both*. (DINO-MX is handed the
crops by replacing its ``MultiCrop`` with a replay of the precomputed ones.) Mask drawing for the
DINOv2 row is part of its step and is timed.

Timing: each side first runs ``--warmup`` untimed steps, then ``--steps`` timed steps round by
round on the same crops, the order rotating every round (A B C, B C A, ...) so that load from other
processes on the machine hits every side alike; images/s = batch / median step time. Three ratios
are reported: of median wall-clock images/s; of images per CPU-second of this process (CPU only:
it leaves out the time other processes held the cores, so it is the steadier one on a shared
machine); and the median over rounds of the paired step-time ratio.

    python -m benchmarks.dinomx_vs_lightly                      # vit-mini-p4, BloodMNIST, batch 64, fp32 and bf16
    python -m benchmarks.dinomx_vs_lightly --amp bf16 --compile --lightly-fused --steps 20
    python -m benchmarks.dinomx_vs_lightly --compile --stream    # the published table

Each precision in ``--amp`` is one run (all its sides interleaved); the results of all of them are
written to ``benchmarks/results/dinomx_vs_lightly.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from benchmarks.host import host
from training.config import load_config
from training.dinomx.crops import Crops, MultiCrop
from training.dinomx.data import PretrainData
from training.dinomx.recipe import Pretraining
from training.loop import amp_dtype
from zoo import store
from zoo.backbones import ViTBackbone, create_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dinomx_vs_lightly"
# lightly 1.6's DINOProjectionHead uses torch.nn.utils.weight_norm, which torch flags as deprecated on every build.
warnings.filterwarnings("ignore", message=r".*weight_norm.*deprecated", category=FutureWarning)


def load_images(data: str, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n, C, 28, 28) uint8 training images: a MedMNIST flag's train split, or ``random`` noise (tests).

    Step time does not depend on pixel values, so ``random`` only saves reading a file.
    """
    if data == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8), "uniform random uint8, 3 x 28 px"
    from zoo.data import load_split

    images = load_split(data, "train", size=28, download=False).images
    return images[:n].contiguous(), f"{data} train split, first {min(n, len(images))} images"


class Replay:
    """Stands in for a Pretraining task's ``MultiCrop``: returns the crops precomputed for the current step."""

    def __init__(self) -> None:
        self.current: Crops | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Crops:
        if self.current is None:
            raise RuntimeError("no crops set for this step")
        return self.current


class CLSBackbone(nn.Module):
    """The ViTBackbone as lightly's examples expect a backbone: images -> (B, D) features (the CLS token).

    ``fused``: through DINO-MX's fused forward (CLS only), for the ``--lightly-fused`` row.
    """

    def __init__(self, encoder: ViTBackbone, fused: bool = False):
        super().__init__()
        self.encoder = encoder
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from training.dinomx.fused import encode

            return encode(self.encoder, x, patches=False)[0]
        return self.encoder.encode(x)[0]


class LightlyDINO(nn.Module):
    """lightly's DINO: student and EMA-teacher backbones with ``DINOProjectionHead`` heads."""

    def __init__(self, backbone: nn.Module, embed_dim: int, head: dict[str, Any], freeze_last_steps: int):
        super().__init__()
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        if int(head["nlayers"]) != 3:
            raise ValueError("lightly's DINOProjectionHead has 3 layers; run with head.nlayers=3")
        kw = dict(input_dim=embed_dim, hidden_dim=int(head["hidden_dim"]), bottleneck_dim=int(head["bottleneck_dim"]),
                  output_dim=int(head["out_dim"]), norm_last_layer=bool(head["norm_last_layer"]))
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(**kw, freeze_last_layer=freeze_last_steps)
        self.teacher_backbone = copy.deepcopy(backbone)
        # A new head, as lightly's example makes it (its weight_norm head cannot be deep-copied), started
        # from the student's weights as DINO's teacher is.
        self.teacher_head = DINOProjectionHead(**kw)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x))


class LightlyTrainer:
    """One lightly DINO training step per call, on crops made elsewhere; schedules from the DINO-MX config."""

    def __init__(self, cfg: dict[str, Any], in_chans: int, total: int, device: torch.device, fused: bool = False):
        from lightly.loss import DINOLoss

        m, o, dn = cfg["model"], cfg["optim"], cfg["dino"]
        torch.manual_seed(int(cfg["seed"]))  # as Pretraining does before building: the same backbone weights
        encoder = ViTBackbone(create_model(m["backbone"], in_chans, m["channel_init"], m["revision"],
                                           float(m["drop_path"]), int(cfg["crops"]["global_size"])), pooling="cls")
        self.total = total
        self.model = LightlyDINO(CLSBackbone(encoder, fused), encoder.hidden_size, cfg["head"],
                                 int(float(o["freeze_last_layer"]) * total)).to(device)
        self.criterion = DINOLoss(output_dim=int(cfg["head"]["out_dim"]), warmup_teacher_temp=float(
            dn["warmup_teacher_temp"]), teacher_temp=float(dn["teacher_temp"]), student_temp=float(dn["student_temp"]),
            center_momentum=float(dn["center_momentum"])).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
        self.clip = float(o["clip_grad"])
        self.m0, self.m1 = float(o["momentum_teacher"]), float(o["momentum_teacher_end"])
        warm = max(1, int(float(dn["warmup_teacher_temp_epochs"]) * total))
        self.t_temp = torch.cat([torch.linspace(float(dn["warmup_teacher_temp"]), float(dn["teacher_temp"]), warm),
                                 torch.full((max(0, total - warm),), float(dn["teacher_temp"]))])
        self.device = device
        self.dtype = amp_dtype(o["amp"], device)

    def parameters(self) -> dict[str, int]:
        student = [self.model.student_backbone, self.model.student_head]
        return {"total": sum(p.numel() for s in student for p in s.parameters()),
                "trainable": sum(p.numel() for s in student for p in s.parameters() if p.requires_grad),
                "backbone_total": sum(p.numel() for p in self.model.student_backbone.parameters())}

    def train_step(self, step: int, crops: Crops) -> float:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        mdl = self.model
        momentum = cosine_schedule(step, self.total, self.m0, self.m1)
        update_momentum(mdl.student_backbone, mdl.teacher_backbone, m=momentum)
        update_momentum(mdl.student_head, mdl.teacher_head, m=momentum)
        b = crops.globals.shape[0] // 2
        global_views = list(crops.globals.to(self.device).split(b))
        local_views = list(crops.locals.to(self.device).split(b)) if crops.locals is not None else []
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            with torch.no_grad():
                teacher_out = [mdl.forward_teacher(v) for v in global_views]
            student_out = [mdl(v) for v in global_views + local_views]
            loss = self.criterion(teacher_out, student_out, teacher_temp=float(self.t_temp[step]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in mdl.parameters() if p.grad is not None], self.clip)
        mdl.student_head.cancel_last_layer_gradients(current_epoch=step)
        self.optimizer.step()
        return float(loss.detach())


def dinomx_trainer(preset: str, overrides: list[str], data: PretrainData) -> tuple[Pretraining, Replay, MultiCrop]:
    """A Pretraining whose crops come from a :class:`Replay`; also returns its own MultiCrop."""
    cfg = load_config(f"dinomx/{preset}.yaml", overrides)
    pt = Pretraining(cfg, data)
    replay, crops = Replay(), pt.task.crops
    pt.task.crops = replay  # the step then trains on crops made outside the timed region
    pt.runner.module.train()
    return pt, replay, crops


def _quartiles(v: list[float]) -> list[float]:
    return statistics.quantiles(v, n=4)[::2] if len(v) > 1 else [v[0], v[0]]


def run_benchmark(backbone: str, data: str, n_images: int, batch: int, steps: int, warmup: int, amp: str,
                  dinov2: bool, seed: int = 0, extra: list[str] | None = None, compile_: bool = False,
                  lightly_fused: bool = False, stream: bool = False) -> dict[str, Any]:
    """Measure every side at one precision; returns the result dict (figures as measured, nothing written)."""
    images, data_desc = load_images(data, max(n_images, batch), seed)
    total = warmup + steps
    overrides = [f"model.backbone={backbone}", f"optim.batch_size={batch}", f"optim.steps={total}",
                 f"optim.amp={amp}", f"seed={seed}", "log.progress=false", "checkpoint.every=0", *(extra or [])]
    pd = PretrainData(images)
    mx, replay, multicrop = dinomx_trainer("dino", overrides, pd)
    cfg = mx.raw  # the resolved config dict (mx.cfg is its typed form)
    sides: dict[str, Callable[[int, Crops], Any]] = {}

    def mx_step(pt: Pretraining, rp: Replay) -> Callable[[int, Crops], Any]:
        def step(s: int, crops: Crops) -> Any:
            rp.current = crops
            # step s of the shared loop, then stop (the loop reads the step from pt.state, which is s here)
            return pt.loop.run(pt.task, pt.state, images_per_step=pt.task.batch, stop_after=s + 1)
        return step

    sides["dinomx (DINO preset)"] = mx_step(mx, replay)
    params = {"dinomx (DINO preset)": mx.params}
    variants = [("compiled", ["optim.compile=true"])] if compile_ else []
    if stream and mx.task.dtype is not None:  # the residual stream in bf16: only where the run is in bf16
        variants.append((STREAM, ["optim.low_precision_stream=true"]))
        if compile_:
            variants.append((f"{STREAM}, compiled", ["optim.low_precision_stream=true", "optim.compile=true"]))
    for label, extra_keys in variants:
        pt_v, replay_v, _ = dinomx_trainer("dino", [*overrides, *extra_keys], pd)
        sides[f"dinomx (DINO preset, {label})"] = mx_step(pt_v, replay_v)
        params[f"dinomx (DINO preset, {label})"] = pt_v.params
    lt = LightlyTrainer(cfg, images.shape[1], total, mx.env.device)
    sides["lightly DINO"] = lt.train_step
    params["lightly DINO"] = lt.parameters()
    if lightly_fused:
        ltf = LightlyTrainer(cfg, images.shape[1], total, mx.env.device, fused=True)
        sides["lightly DINO (fused backbone)"] = ltf.train_step
        params["lightly DINO (fused backbone)"] = ltf.parameters()
    if dinov2:
        v2, replay2, _ = dinomx_trainer("dinov2", overrides, pd)
        sides["dinomx (DINOv2 preset)"] = mx_step(v2, replay2)
        params["dinomx (DINOv2 preset)"] = v2.params

    g = torch.Generator().manual_seed(seed)
    cuda = mx.env.device.type == "cuda"
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for s in range(total):
        idx = torch.randperm(images.shape[0], generator=g)[:batch]
        crops = multicrop(images[idx], torch.Generator().manual_seed(seed * 1_000_003 + s))
        k = s % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every round
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name](s, crops)
            if cuda:
                torch.cuda.synchronize()
            if s >= warmup:
                wall[name].append(time.perf_counter() - t0)
                # CPU time of this process: on a shared CPU it leaves out the time other processes held the
                # cores, so it varies far less than wall time (meaningless on GPUs, where it is not reported).
                cpu[name].append(time.process_time() - c0)
    wall_s = time.perf_counter() - t_start
    load_after = os.getloadavg()

    c = cfg["crops"]
    ref = "lightly DINO"
    rows = []
    for name in names:
        med, cpu_med = statistics.median(wall[name]), statistics.median(cpu[name])
        # Round by round, both sides ran on the same crops within seconds: the paired ratio cancels slow drifts.
        paired = [t_ref / t for t_ref, t in zip(wall[ref], wall[name])]
        rows.append({"side": name, "images_per_s": round(batch / med, 2), "median_step_s": round(med, 4),
                     "mean_step_s": round(statistics.fmean(wall[name]), 4),
                     "min_step_s": round(min(wall[name]), 4), "max_step_s": round(max(wall[name]), 4),
                     "images_per_cpu_s": None if cuda else round(batch / cpu_med, 2),
                     "median_step_cpu_s": None if cuda else round(cpu_med, 4),
                     "paired_speed_vs_lightly": {"median": round(statistics.median(paired), 3),
                                                 "quartiles": [round(q, 3) for q in _quartiles(paired)]},
                     "step_times_s": [round(t, 4) for t in wall[name]],
                     "step_cpu_times_s": [round(t, 4) for t in cpu[name]],
                     "student_parameters": {k: int(v) for k, v in params[name].items()}})
    by = {r["side"]: r for r in rows}
    ratios = {f"{r['side']} / {ref}": round(r["images_per_s"] / by[ref]["images_per_s"], 3) for r in rows
              if r["side"] != ref}
    cpu_ratios = {} if cuda else {f"{r['side']} / {ref}": round(r["images_per_cpu_s"] / by[ref]["images_per_cpu_s"], 3)
                                  for r in rows if r["side"] != ref}

    return {
        "backbone": backbone, "data": data_desc, "batch": batch, "warmup_steps": warmup, "timed_steps": steps,
        "precision": amp, "autocast_dtype": str(mx.task.dtype) if mx.task.dtype is not None else "float32",
        "crops": {"global": [2, int(c["global_size"])], "local": [int(c["local_number"]), int(c["local_size"])]},
        "head": {k: cfg["head"][k] for k in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers")},
        "augmentation": "excluded from both: crops made once per step outside the timed region, fed to every side",
        "interleaving": "every side steps on the same crops each round; the order rotates every round",
        "rows": rows, "ratio_images_per_s": ratios, "ratio_images_per_cpu_s": cpu_ratios,
        "target": {"speed_vs_lightly": TARGET, **target_check(ratios, cpu_ratios)},
        "same_trainable_parameters": by["dinomx (DINO preset)"]["student_parameters"]["trainable"]
        == by["lightly DINO"]["student_parameters"]["trainable"],
        "wall_s": round(wall_s, 1),
        "host": host("transformers", "lightly", device=str(mx.env.device),
                     loadavg_1min_before=round(load_before[0], 2), loadavg_1min_after=round(load_after[0], 2)),
    }


STREAM = "bf16 stream"  # the label of the rows with optim.low_precision_stream (what target_check leaves out)
TARGET = 1.5  # a DINO-MX step at least this much faster than lightly's, same backbone, crops and precision


def _best(ratios: dict[str, float], cpu_ratios: dict[str, float], keys: list[str]) -> dict[str, Any]:
    best = max(keys, key=lambda k: cpu_ratios.get(k, ratios[k])) if keys else None
    if best is None:
        return {"best_side": None, "met": False}
    return {"best_side": best.split(" / ")[0], "wall": ratios[best], "cpu": cpu_ratios.get(best),
            "met": (cpu_ratios.get(best) or ratios[best]) >= TARGET}


def target_check(ratios: dict[str, float], cpu_ratios: dict[str, float]) -> dict[str, Any]:
    """Does the fastest DINO-MX DINO row (eager or compiled) reach :data:`TARGET` against lightly?

    ``autocast_only`` answers the same among the rows whose elementwise ops run as lightly's do
    (autocast, no bf16 residual stream).
    """
    keys = [k for k in ratios if k.startswith("dinomx (DINO preset")]
    return {**_best(ratios, cpu_ratios, keys),
            "autocast_only": _best(ratios, cpu_ratios, [k for k in keys if STREAM not in k])}


def table(r: dict[str, Any]) -> list[str]:
    """One precision's table and its notes."""
    lines = [f"**{r['autocast_dtype']}** ({r['host']['torch_threads']} torch threads, 1-min load average "
             f"{r['host']['loadavg_1min_before']} before, {r['host']['loadavg_1min_after']} after; "
             f"{r['warmup_steps']} warm-up + {r['timed_steps']} timed steps per side, {r['wall_s']:.0f} s):", "",
             "| side | images/s (wall) | median s/step | min-max s/step | images/CPU-s | speed vs lightly: wall "
             "| CPU time | paired rounds, median (IQR) | trainable params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        key = f"{row['side']} / lightly DINO"
        ratio = f"{r['ratio_images_per_s'][key]:.3f}x" if key in r["ratio_images_per_s"] else "1 (reference)"
        cpu_ratio = f"{r['ratio_images_per_cpu_s'][key]:.3f}x" if key in r["ratio_images_per_cpu_s"] else (
            "1 (reference)" if row["images_per_cpu_s"] is not None else "n/a")
        pq = row["paired_speed_vs_lightly"]
        paired = (f"{pq['median']:.3f}x ({pq['quartiles'][0]:.3f}-{pq['quartiles'][1]:.3f})" if key in
                  r["ratio_images_per_s"] else "1 (reference)")
        per_cpu = f"{row['images_per_cpu_s']:.2f}" if row["images_per_cpu_s"] is not None else "n/a"
        lines.append(f"| {row['side']} | {row['images_per_s']:.2f} | {row['median_step_s']:.3f} | "
                     f"{row['min_step_s']:.3f}-{row['max_step_s']:.3f} | {per_cpu} | {ratio} | {cpu_ratio} | "
                     f"{paired} | {row['student_parameters'].get('trainable', 0):,} |")
    t = r["target"]
    if t.get("best_side"):
        cpu = f", {t['cpu']:.2f}x in CPU time" if t.get("cpu") else ""
        lines += ["", f"Target >= {TARGET}x: {'met' if t['met'] else 'NOT met'} at {r['autocast_dtype']} "
                  f"(best DINO-MX DINO row, `{t['best_side']}`: {t['wall']:.2f}x wall{cpu})."]
        a = t.get("autocast_only") or {}
        if a.get("best_side") and a["best_side"] != t["best_side"]:
            cpu_a = f", {a['cpu']:.2f}x in CPU time" if a.get("cpu") else ""
            lines.append(f"Among the rows with lightly's autocast (no bf16 stream): {'met' if a['met'] else 'NOT met'}"
                         f" (`{a['best_side']}`: {a['wall']:.2f}x wall{cpu_a}).")
    return lines


def markdown(runs: list[dict[str, Any]]) -> str:
    r = runs[0]
    lines = [f"Training-step throughput on {r['host']['device']}, one run per precision; other processes were "
             "running on the machine, so every side was timed in the same rounds.", "",
             f"Backbone `{r['backbone']}`, batch {r['batch']}, 2 global crops of {r['crops']['global'][1]} px and "
             f"{r['crops']['local'][0]} local crops of {r['crops']['local'][1]} px, head {r['head']}. "
             f"Data: {r['data']}. Augmentation is {r['augmentation']}.", ""]
    for run in runs:
        lines += [*table(run), ""]
    lines += ["Speed vs lightly > 1 means faster than lightly. Wall: ratio of median wall-clock images/s. CPU "
              "time: the same from this process's CPU time per step, which leaves out time other processes held the "
              "cores (the steadier figure on a shared CPU). Paired rounds: median over rounds of lightly's step time "
              "/ this side's, both on the same crops in the same round.", "",
              "Both sides train the same backbone weights, heads, optimizer and schedules at the same precision, and "
              "both run the teacher on the global crops only. lightly's side follows its DINO example (each view "
              "forwarded separately through the transformers module). DINO-MX forwards the globals and the locals in "
              "one batch each, runs the DINO head once, and trains the backbone through its fused forward "
              "(`training/dinomx/fused.py`: one QKV matmul per block, fused attention on CUDA and the explicit "
              "form on the CPU, and only the CLS row in the "
              "last block, since the DINO loss reads nothing else; same math, to rounding). The `lightly DINO (fused "
              "backbone)` row (if present) gives lightly that same forward: what remains between it and DINO-MX is "
              "the trainer. The compiled row adds `torch.compile` (compilation excluded, in the warm-up). "
              "The `bf16 stream` rows (bf16 only) keep the blocks' residual stream in bf16 "
              "(`optim.low_precision_stream=true`, as "
              "DINOv2's FSDP mixed precision computes its blocks) where autocast, on lightly's side and in the other "
              "rows, returns to float32 after every matmul; master weights and optimizer state are float32 on every "
              "side. The DINOv2 "
              "row (if present) also computes iBOT and KoLeo losses, so it does more work per image than either DINO "
              "row."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit-mini-p4", help="named config, local HF directory or hub id")
    ap.add_argument("--data", default="bloodmnist", help="MedMNIST flag (28 px train split) or 'random'")
    ap.add_argument("--images", type=int, default=2048, help="images to draw batches from")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "auto"],
                    help="precisions, one run each (every side of a run at the same one)")
    ap.add_argument("--compile", action="store_true", help="also time the DINO-MX step under torch.compile")
    ap.add_argument("--lightly-fused", action="store_true", help="also time lightly's step on the fused backbone")
    ap.add_argument("--stream", action="store_true",
                    help="at bf16, also time DINO-MX with its residual stream in bf16 (optim.low_precision_stream)")
    ap.add_argument("--dinov2", action="store_true", help="also time the full DINOv2-style DINO-MX step")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (every side alike)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json and .md are written)")
    ap.add_argument("overrides", nargs="*", help="DINO-MX config key=value applied to every side (head.*, crops.*)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = []
    for amp in a.amp:
        r = run_benchmark(a.backbone, a.data, a.images, a.batch, a.steps, a.warmup, amp, a.dinov2, a.seed,
                          a.overrides, a.compile, a.lightly_fused, a.stream)
        runs.append(r)
        for row in r["rows"]:
            cpu_note = f", {row['images_per_cpu_s']:.2f} images per CPU-second" if row["images_per_cpu_s"] else ""
            print(f"{r['autocast_dtype']:9s} {row['side']:32s} {row['images_per_s']:8.2f} images/s (median "
                  f"{row['median_step_s']:.3f} s/step{cpu_note})", flush=True)
        for k, v in r["ratio_images_per_s"].items():
            cpu_v = r["ratio_images_per_cpu_s"].get(k)
            print(f"{r['autocast_dtype']:9s} ratio {k}: {v:.3f} (wall-clock images/s)"
                  + (f", {cpu_v:.3f} (per CPU-second)" if cpu_v else ""), flush=True)
    result = {"runs": runs, "target_speed_vs_lightly": TARGET}
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(runs))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
