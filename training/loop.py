"""The training loop: steps, schedule, mixed precision, validation, best-AUC selection. Nothing else.

Data are in-memory tensors (uint8 images or cached features); ``prep`` turns a batch into model
input. The checkpoint kept is the one with the best validation AUC; test data never steer it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from training import distributed as D
from training.losses import MedAlmightyLoss
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
        raise ValueError(f"train.amp must be none, bf16 or auto, got {setting!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_optimizer(params, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = cfg["optimizer"], float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(cfg.get("momentum", 0.9)))
    raise ValueError(f"train.optimizer must be adam, adamw or sgd, got {name!r}")


def lr_factor(cfg: dict[str, Any], steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step lr multiplier for ``multistep`` (epoch milestones), ``cosine`` (+ warm-up), ``constant``."""
    epochs = int(cfg["epochs"])
    total = max(1, epochs * steps_per_epoch)
    warm = int(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)
    kind = cfg["schedule"]
    if kind == "multistep":
        # Half-up rounding: 5 epochs with milestone 0.5 drop after epoch 3 (Python's round() would say 2).
        marks = [math.floor(m * epochs + 0.5) * steps_per_epoch for m in cfg.get("milestones", (0.5, 0.75))]
        gamma = float(cfg.get("gamma", 0.1))
        return lambda step: gamma ** sum(step >= m for m in marks)
    if kind == "cosine":

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return f
    if kind == "constant":
        return lambda step: 1.0
    raise ValueError(f"train.schedule must be multistep, cosine or constant, got {kind!r}")


@dataclass
class FitResult:
    model: nn.Module
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _scores(model, x, prep, task, batch_size) -> np.ndarray:
    return logits_to_probs(predict_logits(model, x, prep, batch_size), task).numpy()


def _agreed_auc(auc: float, env: D.DistEnv) -> float:
    """The main process's validation AUC, on every process: the best-epoch choice (a collective
    state gather under sharded strategies) must be the same everywhere, even where local batch-norm
    statistics made the processes' models differ slightly."""
    if env.world == 1:
        return auc
    import torch.distributed as dist

    box = [auc]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    task: str,
    cfg: dict[str, Any],
    loss_fn: MedAlmightyLoss,
    prep: Preprocess | None = None,
    teacher_logits: torch.Tensor | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    desc: str = "train",
    device: str | torch.device = "cpu",
    env: D.DistEnv | None = None,
    distributed: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``train = (inputs, labels)``; return it with its best-val-AUC weights.

    Args:
        cfg: the ``train`` (or ``probe``) section of a recipe config.
        prep: preprocessing applied per batch to uint8 images; ``None`` for feature tensors.
        teacher_logits: (N_train, K) cached teacher logits aligned with ``train``; ``None`` = no KD.
        test: evaluated each epoch only when ``cfg["log_test_every_epoch"]`` (time-to-accuracy
            reports); never used for selection.
        env: the process's place in a multi-process run (:func:`training.distributed.init`); ``None``
            is one process on ``device``. With several processes each global batch (``batch_size``
            rows, drawn from ``generator`` alike everywhere) is split across them, and the result's
            model and history are complete on the main process.
        distributed: the run's ``distributed`` config section (strategy options such as ``zero_stage``).
    """
    env = env or D.DistEnv("none", 0, 1, 0, torch.device(device))
    device = env.device
    sharded = env.world > 1
    x, y = train
    n = x.shape[0]
    bs = int(cfg["batch_size"])
    steps = math.ceil(n / bs)
    # A step budget for small datasets: 12 epochs of 546 images are too few updates to converge.
    epochs_n = max(int(cfg["epochs"]), math.ceil(int(cfg.get("min_steps", 0)) / steps))
    cfg = dict(cfg, epochs=epochs_n)
    model.to(device).train()
    # FSDP and DeepSpeed flatten parameters into contiguous buffers (FSDP2 refuses channels-last ones).
    cl = bool(cfg.get("channels_last", False)) and prep is not None and not (
        sharded and env.strategy in ("fsdp", "deepspeed"))
    if cl:
        model.to(memory_format=torch.channels_last)
    if sharded and env.device.type == "cuda":
        # Batch statistics over the global batch, as one process computes them (SyncBatchNorm is
        # CUDA-only: on CPU each process normalises with its own rows' statistics).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Sharding strategies change the module in place; the returned model is a plain copy.
    plain = copy.deepcopy(model) if sharded and env.strategy in ("fsdp", "deepspeed") else model
    runner = D.wrap(env, model, lambda groups: make_optimizer(groups, cfg),
                    lambda m: [p for p in m.parameters() if p.requires_grad], {"distributed": dict(distributed or {})})
    opt = runner.optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(runner.torch_optimizer, lr_factor(cfg, steps))
    dtype = amp_dtype(cfg.get("amp", "none"), device)
    eval_bs = int(cfg.get("eval_batch_size", 256))
    progress = bool(cfg.get("progress", True))

    best_auc, best_epoch, best_state, best_val = -1.0, 0, None, {}
    history: list[dict[str, Any]] = []
    train_seconds = elapsed = 0.0
    if sharded and 0 < n % bs < env.world:
        raise ValueError(f"the last batch of each epoch ({n % bs} of {n} images) cannot be split over {env.world} "
                         "processes; change train.batch_size")
    show = progress and env.is_main
    epochs = tqdm(range(1, epochs_n + 1), desc=desc, disable=not show, unit="ep")
    for epoch in epochs:
        t0 = time.perf_counter()
        epoch_lr = opt.param_groups[0]["lr"]
        sums = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        bar = tqdm(iterate_batches(n, bs, shuffle=True, generator=generator), total=steps, leave=False,
                   desc=f"epoch {epoch}", disable=not show, unit="batch")
        for idx in bar:
            rows = len(idx)
            if sharded:  # this process's rows of the global batch (every process drew the same idx)
                offset, size = env.split(rows)
                idx = idx[offset:offset + size]
            xb = preprocess(x[idx], prep) if prep is not None else x[idx].float()
            xb = xb.to(device, non_blocking=True)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = runner.module(xb)
            tl = teacher_logits[idx].to(device) if teacher_logits is not None else None
            out = loss_fn(logits.float(), y[idx].to(device), tl)
            loss = out["loss"]
            if sharded and len(idx) * env.world != rows:
                # Uneven split: weigh each process's mean by its share, so that the mean of the
                # processes' gradients is the gradient of the global batch's mean loss.
                loss = loss * (len(idx) * env.world / rows)
            runner.zero_grad()
            runner.backward(loss)
            runner.step()
            sched.step()
            for k in sums:
                sums[k] += float(out[k].detach()) * len(idx)
            bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}")
        if sharded:
            sums = D.total(sums, env)  # over every process's rows
        epoch_train_s = time.perf_counter() - t0
        train_seconds += epoch_train_s
        with torch.no_grad():  # every process validates (a forward is collective under sharded strategies)
            val_m = compute_metrics(val[1].numpy(), _scores(model, val[0], prep, task, eval_bs), task)
        # Time-to-accuracy counts training and validation, not the optional test logging below.
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch, "lr": epoch_lr, **{k: v / n for k, v in sums.items()},
               "val_acc": val_m["acc"], "val_auc": val_m["auc"], "epoch_train_s": round(epoch_train_s, 3),
               "elapsed_s": round(elapsed, 3)}
        if test is not None and cfg.get("log_test_every_epoch", False):
            with torch.no_grad():
                test_m = compute_metrics(test[1].numpy(), _scores(model, test[0], prep, task, eval_bs), task)
            row.update(test_acc=test_m["acc"], test_auc=test_m["auc"])
        history.append(row)
        auc = _agreed_auc(val_m["auc"], env)
        if auc > best_auc:
            best_auc, best_epoch, best_val = auc, epoch, val_m
            best_state = copy.deepcopy(model.state_dict() if not sharded else runner.model_state())
        epochs.set_postfix(loss=f"{row['loss']:.4f}", val_auc=f"{val_m['auc']:.4f}", val_acc=f"{val_m['acc']:.4f}",
                           best=best_epoch)
    if best_state is not None and (not sharded or env.is_main):
        plain.load_state_dict(best_state)
    plain.to(memory_format=torch.contiguous_format).eval()
    return FitResult(model=plain, best_epoch=best_epoch, best_val=best_val, history=history, seconds=train_seconds)
