"""The MedAlmighty recipe end to end: config -> teacher (cached) -> student -> an entry or run folder.

Three methods share it: ``baseline`` (the student on the labels alone), ``linear`` (a frozen ViT with
a linear head: the paper's "DINOv2 + linear", also the teacher) and ``medalmighty`` (the student
distilled from that teacher with ``a * L_task + (1 - a) * t^2 * KL``). The student trains with
:func:`training.loop.fit` on cached teacher logits; the folder is written by :mod:`training.outputs`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training import distributed as D
from training.loop import FitResult, FitSettings, fit, seed_everything
from training.medalmighty.config import MedAlmightyConfig, parse
from training.medalmighty.losses import MedAlmightyLoss
from training.medalmighty.teacher import Teacher, features, load_teacher, teacher_logits, train_probe
from training.outputs import write_config, write_results
from zoo.data import SPLITS, DatasetInfo, Preprocess, Split, dataset_info, load_split
from zoo.inference import logits_to_probs
from zoo.loading import evaluate, load
from zoo.metrics import compute_metrics
from zoo.models import LinearClassifier, create_student
from zoo.registry import MEDMNIST_MEAN, MEDMNIST_STD, ZooEntry


def run_entry(cfg: MedAlmightyConfig, info: DatasetInfo, teacher: Teacher | None,
              recipe: str = "medalmighty/default.yaml") -> ZooEntry:
    """The entry a ``zoo train`` run produces (no registry name): everything read from its config."""
    if cfg.method == "linear":
        assert teacher is not None
        p, arch, lineage = teacher.prep, "vit", teacher.source
    else:
        c = info.n_channels
        d = cfg.data
        p = Preprocess(d.input_size, c, d.mean or MEDMNIST_MEAN, d.std or MEDMNIST_STD, d.resize)
        arch = cfg.model.arch
        lineage = teacher.source if teacher is not None else None
    name = cfg.run_name or f"{cfg.method}-{arch}-{info.flag}"
    return ZooEntry(name=name, method=cfg.method, arch=arch, dataset=info.flag, task=info.task, labels=info.labels,
                    in_chans=p.in_chans, input_size=p.input_size, mean=p.mean, std=p.std, resize=p.resize,
                    teacher=lineage, license=info.license, recipe=recipe, small_stem=cfg.model.small_stem,
                    data_size=cfg.data.size,
                    teacher_input_size=teacher.prep.input_size if teacher is not None and cfg.method == "medalmighty"
                    else None)


def student_settings(cfg: MedAlmightyConfig, progress: bool) -> FitSettings:
    t = cfg.train
    return FitSettings(epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
                       weight_decay=t.weight_decay, momentum=t.momentum, schedule=t.schedule,
                       milestones=t.milestones, gamma=t.gamma, warmup_epochs=t.warmup_epochs, min_steps=t.min_steps,
                       amp=t.amp, channels_last=t.channels_last, eval_batch_size=t.eval_batch_size,
                       log_test_every_epoch=t.log_test_every_epoch, progress=progress)


def run(raw: dict[str, Any], out: Path | None, entry: ZooEntry | None = None, progress: bool = True,
        recipe: str = "medalmighty/default.yaml") -> dict[str, Any] | None:
    """Train what the resolved config ``raw`` describes and write the folder ``out``.

    ``entry`` is the registry entry of a ``zoo build`` (its preprocessing is what the config was
    derived from); ``None`` for a ``zoo train`` run, whose entry is read from the config. Under
    ``torchrun`` every process trains its share of each batch; only the main process writes (``out``
    may be None elsewhere) and gets the metrics; the others return None.
    """
    cfg = parse(raw)
    env = D.init(cfg.distributed.strategy, cfg.distributed.backend)
    t_start = time.perf_counter()
    raw = json.loads(json.dumps(raw))  # a plain copy; it is saved verbatim
    raw["train"]["progress"] = cfg.train.progress and progress
    show = raw["train"]["progress"] and env.is_main
    d = cfg.data
    info = dataset_info(d.dataset)
    splits = {s: load_split(info.flag, s, size=d.size, root=d.root, download=d.download) for s in SPLITS}
    gen = seed_everything(cfg.seed)

    teacher = head = probe = logits = None
    lineage: dict[str, Any] = {}
    if cfg.method in ("linear", "medalmighty"):
        teacher = load_teacher(cfg)
        feats = features(teacher, splits, cfg, show)
        if teacher.head is not None:
            head = teacher.head
        else:
            probe = train_probe(feats, splits, info.task, len(info.labels), cfg, gen, show)
            head = probe.head
        lineage = {"teacher_backbone": teacher.source, "teacher_sha256": teacher.sha256,
                   "teacher_input_size": teacher.prep.input_size, "teacher_resolution": teacher.resolution,
                   "pooling": teacher.backbone.pooling}
        if cfg.method == "medalmighty":
            logits = teacher_logits(teacher, head, feats, cfg)
            lineage["teacher_metrics"] = {
                s: compute_metrics(splits[s].labels.numpy(), logits_to_probs(logits[s], info.task).numpy(), info.task)
                for s in ("val", "test")
            }

    if entry is None:
        entry = run_entry(cfg, info, teacher, recipe)
    elif cfg.method == "linear" and teacher.prep != entry.preprocess:
        raise ValueError(f"{entry.name} expects {entry.preprocess} but the teacher's backbone gives {teacher.prep}; "
                         "use `zoo train` for another backbone")
    if not env.is_main:  # the other processes only share the student's training
        if cfg.method != "linear":
            _train_student(cfg, entry, info, splits, logits, env, show, gen)
        return None
    out.mkdir(parents=True, exist_ok=True)
    if cfg.method == "linear":
        net = LinearClassifier(teacher.backbone, info.num_outputs)
        net.head.load_state_dict(head.state_dict())
        history, best_epoch = (probe.fit.history, probe.fit.best_epoch) if probe else ([], 0)
        teacher.backbone.model.save_pretrained(out / "backbone", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in net.head.state_dict().items()}, out / "model.safetensors")
    else:
        res = _train_student(cfg, entry, info, splits, logits, env, show, gen)
        history, best_epoch = res.history, res.best_epoch
        save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()}, out / "model.safetensors")
        if head is not None:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "teacher_head.safetensors")

    config = write_config(out, entry, raw, lineage)
    # The card's figures come from the saved files through the user's path: load + predict.
    model = load(out)
    results = {s: evaluate(model, s) for s in ("val", "test")}
    metrics = {
        "val": {k: results["val"][k] for k in ("acc", "auc")},
        "test": {k: results["test"][k] for k in ("acc", "auc")},
        "seed": cfg.seed, "best_epoch": best_epoch, "epochs": len(history),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "train_time_s": round(sum(h["epoch_train_s"] for h in history), 2),
        "history": history,
    }
    if lineage.get("teacher_metrics"):
        metrics["teacher"] = lineage["teacher_metrics"]
    write_results(out, entry, config, metrics)
    return metrics


def _train_student(cfg: MedAlmightyConfig, entry: ZooEntry, info: DatasetInfo, splits: dict[str, Split],
                   logits: dict[str, torch.Tensor] | None, env: D.DistEnv, progress: bool,
                   gen: torch.Generator) -> FitResult:
    """The student's training (every process of a multi-process run takes part, drawing the same
    batches from ``gen``). One process trains on the CPU, as it always has."""
    torch.manual_seed(cfg.seed)
    net = create_student(entry.arch, info.num_outputs, entry.in_chans, cfg.model.small_stem)
    alpha = 1.0 if cfg.method == "baseline" else cfg.distill.alpha
    loss = MedAlmightyLoss(info.task, alpha, cfg.distill.temperature)
    s = splits
    return fit(net, (s["train"].images, s["train"].labels), (s["val"].images, s["val"].labels), task=info.task,
               settings=student_settings(cfg, progress), loss_fn=loss, prep=entry.preprocess,
               teacher_logits=logits["train"] if logits is not None else None,
               test=(s["test"].images, s["test"].labels), generator=gen, desc=entry.name,
               env=env if env.world > 1 else None, zero_stage=cfg.distributed.zero_stage)
