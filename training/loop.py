"""The training loop every recipe shares: steps, schedules, the optimizer update, logging, checkpoints.

A recipe's *task* owns its models, data and losses (DINOv2's meta-architecture): ``forward(step)``
returns a dict of losses with ``"loss"`` the one to minimise, and two hooks run around the optimizer
step (DINO-MX freezes its prototypes before it and updates its EMA teacher after it). The loop knows
nothing about what is trained: it sets the lr/weight-decay of the step, back-propagates through the
:mod:`training.distributed` runner, clips, steps, logs, and asks the checkpointer to save::

    loop = Loop(runner, lr=schedule, env=env)
    state = loop.run(task, LoopState(), on_step=...)

:func:`fit` is the supervised recipe (students, probes) on this loop: epochs over in-memory data,
validation each epoch, the weights with the best validation AUC kept.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3
from tqdm.auto import tqdm

from training import distributed as D
from training.augment import Augment
from training.schedules import lr_factors
from zoo.data import Preprocess, iterate_batches, preprocess
from zoo.inference import logits_to_probs, predict_logits
from zoo.metrics import compute_metrics


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``none`` | ``bf16`` | ``auto``: bf16 autocast where the device does bf16 natively."""
    if setting == "none":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"amp must be none, bf16 or auto, got {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
                   ) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"optimizer must be adam, adamw or sgd, got {name!r}")


# ----------------------------------------------------------------------------------------- the loop


class Task(Protocol):
    """What the loop trains (see the module doc)."""

    def forward(self, step: int) -> dict[str, torch.Tensor]: ...

    def before_update(self, step: int) -> None: ...

    def after_update(self, step: int) -> None: ...


@dataclass
class LoopState:
    """Where a run stands; checkpoints hold it (with the task's and optimizer's state)."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0


class Loop:
    """Steps with per-step schedules (see the module doc).

    Args:
        runner: the :mod:`training.distributed` runner around the trained module.
        lr: the lr of every step; each parameter group gets ``lr[step] * group["lr_scale"]`` (1 if unset).
        weight_decay: per-step weight decay of the groups with ``wd_on`` (others get 0); ``None``
            leaves the optimizer's own.
        clip_grad: max global gradient norm (0 = off).
        env: the process's place in a multi-process run.
    """

    def __init__(self, runner: D.Runner, lr: np.ndarray, env: D.DistEnv, weight_decay: np.ndarray | None = None,
                 clip_grad: float = 0.0):
        self.runner, self.lr, self.wd, self.clip, self.env = runner, lr, weight_decay, clip_grad, env
        self.total = len(lr)

    def set_schedules(self, step: int) -> None:
        for g in self.runner.optimizer.param_groups:
            g["lr"] = float(self.lr[step]) * g.get("lr_scale", 1.0)
            if self.wd is not None:
                g["weight_decay"] = float(self.wd[step]) if g.get("wd_on", True) else 0.0

    def run(self, task: Task, state: LoopState, *, images_per_step: int = 0, stop_after: int | None = None,
            on_step: Callable[[int, dict[str, torch.Tensor], float], None] | None = None) -> LoopState:
        """Train from ``state.step`` to the end (or to ``stop_after`` steps); returns the updated state.

        ``on_step(steps_done, losses, grad_norm)`` runs after every update (logging, checkpoints, evaluation).
        """
        runner = self.runner
        while state.step < self.total:
            step = state.step
            t0 = time.perf_counter()
            self.set_schedules(step)
            out = task.forward(step)
            loss = out["loss"]
            if not torch.isfinite(loss):
                hint = getattr(task, "nonfinite_hint", "lower the learning rate")
                raise FloatingPointError(f"the loss is {float(loss)} at step {step}; {hint}")
            runner.zero_grad()
            runner.backward(loss)
            grad_norm = runner.clip_grad(self.clip)
            task.before_update(step)
            runner.step()
            task.after_update(step)
            state.seconds += time.perf_counter() - t0
            state.images_seen += images_per_step
            state.step += 1
            if on_step is not None:
                on_step(state.step, out, grad_norm)
            if stop_after is not None and state.step >= stop_after:
                break
        return state


# ----------------------------------------------------------------------------------------- supervised


@dataclass(frozen=True)
class FitSettings:
    """What the supervised loop needs (a recipe's ``train`` section, or a probe's)."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_steps: int = 0
    max_steps: int = 0  # > 0: fewer epochs on large datasets, whole epochs of at most this many steps
    amp: str = "none"
    channels_last: bool = False
    eval_batch_size: int = 256
    log_test_every_epoch: bool = False
    progress: bool = True
    augment: Augment | None = None  # applied to each training batch (uint8 images), from its own generator
    augment_seed: int = 0
    ema: float = 0.0  # > 0: validate and keep an EMA of the weights with this decay (timm's ModelEmaV3)


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _scores(model, x, prep, task, batch_size) -> np.ndarray:
    return logits_to_probs(predict_logits(model, x, prep, batch_size), task).numpy()


def _to(x, device: torch.device):
    """A batch of teacher targets on ``device``: a tensor, or a dict of tensors / lists of tensors."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return [_to(v, device) for v in x]


class SupervisedTask:
    """Mini-batches of in-memory data through a classifier, with a :class:`~training.medalmighty.losses.MedAlmightyLoss`
    (optionally against cached teacher logits). Each epoch's order is drawn from ``generator``."""

    def __init__(self, runner: D.Runner, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, batch_size: int,
                 steps_per_epoch: int, generator: torch.Generator | None, env: D.DistEnv, prep: Preprocess | None,
                 teacher_logits: torch.Tensor | None, channels_last: bool, dtype: torch.dtype | None,
                 augment: Augment | None = None, augment_seed: int = 0, ema=None):
        self.runner, self.x, self.y, self.loss_fn = runner, x, y, loss_fn
        self.bs, self.steps, self.gen, self.env, self.prep = batch_size, steps_per_epoch, generator, env, prep
        self.teacher_logits, self.cl, self.dtype = teacher_logits, channels_last, dtype
        self.augment, self.ema = augment, ema
        # Its own stream (not the batch order's), so a run with augmentation draws the same batches.
        self.aug_gen = torch.Generator().manual_seed(augment_seed + 0x5EED) if augment is not None else None
        self.batches: list[torch.Tensor] = []
        self.sums = {"loss": 0.0, "task": 0.0, "kd": 0.0}

    def forward(self, step: int) -> dict[str, torch.Tensor]:
        if step % self.steps == 0:  # a new epoch: its order, drawn as a plain loop over the data would
            self.batches = list(iterate_batches(self.x.shape[0], self.bs, shuffle=True, generator=self.gen))
            self.sums = dict.fromkeys(self.sums, 0.0)
        idx = self.batches[step % self.steps]
        rows = len(idx)
        env = self.env
        if env.world > 1:  # this process's rows of the global batch (every process drew the same idx)
            offset, size = env.split(rows)
            idx = idx[offset:offset + size]
        raw = self.x[idx]
        if self.augment is not None:  # the whole global batch is augmented alike on every process
            raw = self.augment(raw, self.aug_gen)
        xb = preprocess(raw, self.prep) if self.prep is not None else raw.float()
        xb = xb.to(env.device, non_blocking=True)
        if self.cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(env.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.runner.module(xb)
        tl = _to(self.teacher_logits[idx], env.device) if self.teacher_logits is not None else None
        out = self.loss_fn(logits.float(), self.y[idx].to(env.device), tl)
        for k in self.sums:  # epoch means of the loss terms, before any rescaling below
            self.sums[k] += float(out[k].detach()) * len(idx)
        if env.world > 1 and len(idx) * env.world != rows:
            # Uneven split: weigh each process's mean by its share, so that the mean of the
            # processes' gradients is the gradient of the global batch's mean loss.
            out = {**out, "loss": out["loss"] * (len(idx) * env.world / rows)}
        return out

    def before_update(self, step: int) -> None:
        pass

    def after_update(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.runner.inner, step=step)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    task: str,
    settings: FitSettings,
    loss_fn: nn.Module,
    prep: Preprocess | None = None,
    teacher_logits=None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    desc: str = "train",
    device: str | torch.device = "cpu",
    env: D.DistEnv | None = None,
    zero_stage: int = 2,
) -> FitResult:
    """Train ``model`` on ``train = (inputs, labels)``; return it with its best-val-AUC weights.

    Args:
        settings: the loop's settings (a recipe's ``train`` section, or a probe's).
        prep: preprocessing applied per batch to uint8 images; ``None`` for feature tensors.
        teacher_logits: (N_train, K) cached teacher logits aligned with ``train`` (or any object whose
            ``[idx]`` gives the loss's teacher targets for a batch, e.g. several teachers'); ``None`` = no KD.
            Trainable parameters of ``loss_fn`` (CA-MKD's projectors) train with the model.
        test: evaluated each epoch only when ``settings.log_test_every_epoch`` (time-to-accuracy
            reports); never used for selection.
        env: the process's place in a multi-process run (:func:`training.distributed.init`); ``None``
            is one process on ``device``. With several processes each global batch (``batch_size``
            rows, drawn from ``generator`` alike everywhere) is split across them, and the result's
            model and history are complete on the main process.
        zero_stage: DeepSpeed's ZeRO stage when ``env.strategy`` is ``deepspeed``.
    """
    s = settings
    env = env or D.DistEnv("none", 0, 1, 0, torch.device(device))
    device = env.device
    sharded = env.world > 1
    x, y = train
    n = x.shape[0]
    bs = s.batch_size
    steps = math.ceil(n / bs)
    # A step budget: 12 epochs of 546 images are too few updates to converge (min_steps), and 12 epochs
    # of 34 581 images take hours on a CPU (max_steps). Whole epochs; min_steps wins where the two disagree.
    epochs_n = min(s.epochs, max(1, s.max_steps // steps)) if s.max_steps else s.epochs
    epochs_n = max(epochs_n, math.ceil(s.min_steps / steps))
    model.to(device).train()
    loss_fn.to(device)
    if sharded and any(p.requires_grad for p in loss_fn.parameters()):
        raise ValueError("a loss with trainable parameters (CA-MKD's projectors) trains in one process only; "
                         "set distributed.strategy=none")
    # FSDP and DeepSpeed flatten parameters into contiguous buffers (FSDP2 refuses channels-last ones).
    cl = s.channels_last and prep is not None and not (sharded and env.strategy in ("fsdp", "deepspeed"))
    if cl:
        model.to(memory_format=torch.channels_last)
    if sharded and env.device.type == "cuda":
        # Batch statistics over the global batch, as one process computes them (SyncBatchNorm is
        # CUDA-only: on CPU each process normalises with its own rows' statistics).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Sharding strategies change the module in place; the returned model is a plain copy.
    plain = copy.deepcopy(model) if sharded and env.strategy in ("fsdp", "deepspeed") else model
    runner = D.wrap(env, model, lambda groups: make_optimizer(groups, s.optimizer, s.lr, s.weight_decay, s.momentum),
                    lambda m: [p for p in m.parameters() if p.requires_grad]
                    + [p for p in loss_fn.parameters() if p.requires_grad],
                    {"distributed": {"zero_stage": zero_stage}})
    lr = s.lr * lr_factors(s.schedule, epochs_n, steps, s.milestones, s.gamma, s.warmup_epochs)
    loop = Loop(runner, lr, env)
    dtype = amp_dtype(s.amp, device)
    if sharded and 0 < n % bs < env.world:
        raise ValueError(f"the last batch of each epoch ({n % bs} of {n} images) cannot be split over {env.world} "
                         "processes; change train.batch_size")
    if s.ema > 0 and sharded:
        raise ValueError("train.ema is not supported with several processes yet; use it in single-process runs")
    ema = ModelEmaV3(model, decay=s.ema, use_warmup=True) if s.ema > 0 else None
    sup = SupervisedTask(runner, x, y, loss_fn, bs, steps, generator, env, prep, teacher_logits, cl, dtype,
                         s.augment, s.augment_seed, ema)
    evaluated = ema.module if ema is not None else model  # what is validated, selected and returned

    best = {"auc": -1.0, "epoch": 0, "state": None, "val": {}}
    history: list[dict[str, Any]] = []
    show = s.progress and env.is_main
    bar = tqdm(total=epochs_n, desc=desc, disable=not show, unit="ep")
    clock = {"t0": time.perf_counter(), "train": 0.0, "elapsed": 0.0}

    def end_of_step(done: int, out: dict[str, torch.Tensor], grad_norm: float) -> None:
        if done % steps:
            return
        epoch = done // steps
        sums = D.total(sup.sums, env) if sharded else sup.sums  # over every process's rows
        epoch_train_s = time.perf_counter() - clock["t0"]
        clock["train"] += epoch_train_s
        with torch.no_grad():  # every process validates (a forward is collective under sharded strategies)
            val_m = compute_metrics(val[1].numpy(), _scores(evaluated, val[0], prep, task, s.eval_batch_size), task)
        # Time-to-accuracy counts training and validation, not the optional test logging below.
        clock["elapsed"] += time.perf_counter() - clock["t0"]
        row = {"epoch": epoch, "lr": float(lr[(epoch - 1) * steps]), **{k: v / n for k, v in sums.items()},
               "val_acc": val_m["acc"], "val_auc": val_m["auc"], "epoch_train_s": round(epoch_train_s, 3),
               "elapsed_s": round(clock["elapsed"], 3)}
        if test is not None and s.log_test_every_epoch:
            with torch.no_grad():
                test_m = compute_metrics(test[1].numpy(), _scores(evaluated, test[0], prep, task, s.eval_batch_size),
                                         task)
            row.update(test_acc=test_m["acc"], test_auc=test_m["auc"])
        history.append(row)
        # The main process's validation AUC on every process: the best-epoch choice (a collective state
        # gather under sharded strategies) must be the same everywhere, even where local batch-norm
        # statistics made the processes' models differ slightly.
        auc = D.from_main(val_m["auc"], env)
        if auc > best["auc"]:
            best.update(auc=auc, epoch=epoch, val=val_m,
                        state=copy.deepcopy(evaluated.state_dict() if not sharded else runner.model_state()))
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", val_auc=f"{val_m['auc']:.4f}", val_acc=f"{val_m['acc']:.4f}",
                        best=best["epoch"])
        clock["t0"] = time.perf_counter()

    loop.run(sup, LoopState(), on_step=end_of_step)
    bar.close()
    if best["state"] is not None and (not sharded or env.is_main):
        plain.load_state_dict(best["state"])
    plain.to(memory_format=torch.contiguous_format).eval()
    return FitResult(model=plain, best_epoch=best["epoch"], best_val=best["val"], history=history,
                     seconds=clock["train"])
