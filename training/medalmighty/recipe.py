"""The MedAlmighty recipe end to end: config -> teacher (cached) -> student -> an entry or run folder.

Three methods share it: ``baseline`` (the student on the labels alone), ``linear`` (a frozen ViT with
a linear head: the paper's "DINOv2 + linear", also the teacher) and ``medalmighty`` (the student
distilled from that teacher with ``a * L_task + (1 - a) * t^2 * KL``). The student trains with
:func:`training.loop.fit` on cached teacher logits; the folder is written by :mod:`training.outputs`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import zoo.store as store
from training import distributed as D
from training.augment import augment_for
from training.config import ConfigError
from training.loop import FitResult, FitSettings, fit, seed_everything
from training.medalmighty.config import MedAlmightyConfig, parse
from training.medalmighty.losses import CAMKDLoss, MedAlmightyLoss
from training.medalmighty.teacher import TeacherOutputs, teacher_outputs
from training.outputs import write_config, write_results
from zoo.data import SPLITS, DatasetInfo, Preprocess, Split, dataset_info, load_split
from zoo.inference import logits_to_probs, predict_logits
from zoo.loading import evaluate, load
from zoo.metrics import compute_metrics
from zoo.models import EnsembleClassifier, LinearClassifier, create_student, state_dict_sha256
from zoo.registry import MEDMNIST_MEAN, MEDMNIST_STD, PROBE_METHODS, ZooEntry, registry
from zoo.tasks import get_task


def run_entry(cfg: MedAlmightyConfig, info: DatasetInfo, teachers: list[TeacherOutputs],
              recipe: str = "medalmighty/default.yaml") -> ZooEntry:
    """The entry a ``zoo train`` run produces (no registry name): everything read from its config."""
    vit = teachers[0].vit if teachers else None
    if cfg.method in PROBE_METHODS:
        p, arch, lineage = vit.prep, "vit", vit.source
    else:
        c = info.n_channels
        d = cfg.data
        p = Preprocess(d.input_size, c, d.mean or MEDMNIST_MEAN, d.std or MEDMNIST_STD, d.resize)
        arch = cfg.model.arch
        lineage = ",".join(t.source for t in teachers) if teachers else None
    name = cfg.run_name or f"{cfg.method}-{arch}-{info.flag}"
    distilled = cfg.method in ("medalmighty", "camkd") and teachers
    return ZooEntry(name=name, method=cfg.method, arch=arch, dataset=info.flag, task=info.task, labels=info.labels,
                    in_chans=p.in_chans, input_size=p.input_size, mean=p.mean, std=p.std, resize=p.resize,
                    teacher=lineage, license=info.license, recipe=recipe, small_stem=cfg.model.small_stem,
                    data_size=cfg.data.size,
                    teacher_input_size=teachers[0].lineage["teacher_input_size"] if distilled else None)


def student_settings(cfg: MedAlmightyConfig, progress: bool) -> FitSettings:
    t = cfg.train
    return FitSettings(epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
                       weight_decay=t.weight_decay, momentum=t.momentum, schedule=t.schedule,
                       milestones=t.milestones, gamma=t.gamma, warmup_epochs=t.warmup_epochs, min_steps=t.min_steps,
                       max_steps=t.max_steps,
                       amp=t.amp, channels_last=t.channels_last, eval_batch_size=t.eval_batch_size,
                       log_test_every_epoch=t.log_test_every_epoch, progress=progress,
                       augment=augment_for(t.augment, cfg.data.dataset, t.flip, t.crop_padding),
                       augment_seed=cfg.seed, ema=t.ema)


class TeacherTooWeakError(ValueError):
    """``distill.require_stronger_teacher`` and a teacher no stronger than what it should beat (exit status 1)."""


class MultiTeacher:
    """Several teachers' cached outputs, indexed by batch for :class:`~training.medalmighty.losses.CAMKDLoss`."""

    def __init__(self, teachers: list[TeacherOutputs], split: str = "train"):
        self.logits = [t.logits[split] for t in teachers]
        self.features = [t.features[split] for t in teachers]

    def __getitem__(self, idx) -> dict[str, Any]:
        return {"logits": torch.stack([lg[idx] for lg in self.logits]), "features": [f[idx] for f in self.features]}


def teacher_sources(cfg: MedAlmightyConfig) -> list[str]:
    """``teacher.backbone`` as a list of teachers (one, or several for CA-MKD)."""
    src = cfg.teacher.backbone
    sources = [src] if isinstance(src, str) else list(src)
    if cfg.method == "camkd" and len(sources) < 2:
        raise ConfigError(f"method camkd needs at least 2 teachers in teacher.backbone (a list), got {sources}")
    if cfg.method != "camkd" and len(sources) != 1:
        raise ConfigError(f"method {cfg.method} takes one teacher; {len(sources)} given (CA-MKD: method=camkd)")
    return sources


def _majority(labels: torch.Tensor, task: str) -> dict[str, float]:
    """Val ACC of always answering the most frequent class (per label for multi-label tasks); AUC 0.5."""
    y = labels.numpy()
    if get_task(task).multilabel:
        p = y.mean(axis=0)
        return {"acc": float(np.maximum(p, 1 - p).mean()), "auc": 0.5}
    counts = np.bincount(y[:, 0])
    return {"acc": float(counts.max() / counts.sum()), "auc": 0.5}


def _plain_twin(entry: ZooEntry) -> ZooEntry | None:
    """The baseline entry with the student's own preprocessing (what the distilled student must beat)."""
    for e in registry().values():
        if (e.method == "baseline" and e.arch == entry.arch and e.dataset == entry.dataset
                and e.preprocess == entry.preprocess and e.small_stem == entry.small_stem
                and e.data_size == entry.data_size):
            return e
    return None


def teacher_gate(teacher_val: dict[str, float], val_labels: torch.Tensor, task: str,
                 entry: ZooEntry | None) -> dict[str, Any]:
    """The teacher's validation ACC/AUC against the plain student's (when built) or the majority class.

    A teacher is *weaker* when either figure is below the reference: a student distilled from it is
    pulled towards answers worse than it would reach alone.
    """
    twin = _plain_twin(entry) if entry is not None and entry.is_student else None
    if twin is not None and store.is_built(twin.name):
        m = json.loads((store.entry_dir(twin.name) / "metrics.json").read_text())
        ref, what = {k: float(m["val"][k]) for k in ("acc", "auc")}, f"{twin.name} (built)"
    else:
        ref, what = _majority(val_labels, task), "the majority class"
    weaker = [k for k in ("acc", "auc") if teacher_val[k] < ref[k]]
    return {"reference": what, "reference_val": ref, "teacher_val": {k: float(teacher_val[k]) for k in ("acc", "auc")},
            "stronger": not weaker, "weaker_on": weaker}


def _check_gate(gate: dict[str, Any], name: str, require: bool) -> None:
    if gate["stronger"]:
        return
    t, r = gate["teacher_val"], gate["reference_val"]
    msg = (f"{name}: the teacher is weaker than {gate['reference']} on validation "
           f"({', '.join(gate['weaker_on'])}: teacher ACC {t['acc']:.4f} AUC {t['auc']:.4f} vs "
           f"{r['acc']:.4f} / {r['auc']:.4f}); a student distilled from it is pulled below what it reaches alone")
    if require:
        raise TeacherTooWeakError(msg + "; distill.require_stronger_teacher refuses it: build a stronger teacher")
    print(f"zoo: warning: {msg}", file=sys.stderr, flush=True)


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

    teachers: list[TeacherOutputs] = []
    lineage: dict[str, Any] = {}
    if cfg.method in (*PROBE_METHODS, "medalmighty", "camkd"):
        teachers = [teacher_outputs(src, cfg, splits, info.task, len(info.labels), gen, show)
                    for src in teacher_sources(cfg)]
        lineage = dict(teachers[0].lineage) if len(teachers) == 1 else {"teachers": [t.lineage for t in teachers]}
        if len(teachers) == 1 and raw["teacher"]["input_size"] is None:  # the resolved config says what it used
            raw["teacher"]["input_size"] = lineage["teacher_input_size"]
        if cfg.method not in PROBE_METHODS:
            per = [{s: _metrics(splits[s], t.logits[s], info.task) for s in ("val", "test")} for t in teachers]
            lineage["teacher_metrics"] = per[0] if len(per) == 1 else per
            gates = [teacher_gate(m["val"], splits["val"].labels, info.task, entry) for m in per]
            lineage["teacher_gate"] = gates[0] if len(gates) == 1 else gates
            if env.is_main:
                for g in gates:
                    _check_gate(g, entry.name if entry is not None else cfg.run_name or "this run",
                                cfg.distill.require_stronger_teacher)
    if cfg.method in PROBE_METHODS and teachers[0].vit is None:
        raise ConfigError(f"method {cfg.method} trains a head on a ViT backbone; {teachers[0].source} is a classifier")
    vit = teachers[0].vit if teachers else None
    if entry is None:
        entry = run_entry(cfg, info, teachers, recipe)
    elif cfg.method in PROBE_METHODS and vit.prep != entry.preprocess:
        raise ValueError(f"{entry.name} expects {entry.preprocess} but the teacher's backbone gives {vit.prep}; "
                         "use `zoo train` for another backbone")
    if not env.is_main:  # the other processes only share the student's training
        if cfg.method in ("baseline", "medalmighty"):
            _train_student(cfg, entry, info, splits, teachers, env, show, gen)
        return None
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if cfg.method == "linear":
        t = teachers[0]
        net = LinearClassifier(vit.backbone, info.num_outputs)
        net.head.load_state_dict(t.head.state_dict())
        history, best_epoch = (t.probe.fit.history, t.probe.fit.best_epoch) if t.probe else ([], 0)
        vit.backbone.model.save_pretrained(out / "backbone", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in net.head.state_dict().items()}, out / "model.safetensors")
    elif cfg.method == "finetune":
        res = _finetune(cfg, entry, info, splits, teachers[0], show, gen)
        history, best_epoch = res.history, res.best_epoch
        lineage["probe_val"] = teachers[0].probe.fit.best_val if teachers[0].probe else None
        res.model.backbone.model.save_pretrained(out / "backbone", safe_serialization=True)
        net = res.model
        save_file({k: v.detach().contiguous() for k, v in res.model.head.state_dict().items()},
                  out / "model.safetensors")
    elif cfg.method == "ensemble":
        net, members = _ensemble(cfg, entry, info, splits, env, show)
        history, best_epoch = [], 0
        extra["members"] = members
        lineage["members"] = [{k: m[k] for k in ("source", "seed", "sha256")} for m in members]
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    else:
        res, search = _search(cfg, entry, info, splits, teachers, env, show, gen)
        history, best_epoch = res.history, res.best_epoch
        if search is not None:
            extra["search"] = search
            lineage["distill_chosen"] = search["chosen"]
        save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()}, out / "model.safetensors")
        if len(teachers) == 1 and teachers[0].head is not None and teachers[0].vit is not None:
            save_file({k: v.contiguous() for k, v in teachers[0].head.state_dict().items()},
                      out / "teacher_head.safetensors")

    # a probe's classifier is also written as a transformers one (training.outputs.write_native)
    config = write_config(out, entry, raw, lineage, net=net if cfg.method in PROBE_METHODS else None)
    # The card's figures come from the saved files through the user's path: load + predict.
    model = load(out)
    results = {s: evaluate(model, s) for s in ("val", "test")}
    metrics = {
        "val": {k: results["val"][k] for k in ("acc", "auc")},
        "test": {k: results["test"][k] for k in ("acc", "auc")},
        "seed": cfg.seed, "best_epoch": best_epoch, "epochs": len(history),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "train_time_s": round(sum(h["epoch_train_s"] for h in history), 2),
        "history": history, **extra,
    }
    if lineage.get("teacher_metrics"):
        metrics["teacher"] = lineage["teacher_metrics"]
        metrics["teacher_gate"] = lineage["teacher_gate"]
    write_results(out, entry, config, metrics)
    return metrics


def _metrics(split: Split, logits: torch.Tensor, task: str) -> dict[str, float]:
    return compute_metrics(split.labels.numpy(), logits_to_probs(logits, task).numpy(), task)


def _ensemble(cfg: MedAlmightyConfig, entry: ZooEntry, info: DatasetInfo, splits: dict[str, Split],
              env: D.DistEnv, progress: bool) -> tuple[EnsembleClassifier, list[dict[str, Any]]]:
    """The members of an ensemble: built classifiers given by ``ensemble.members`` (assembled as they
    are), else ``ensemble.size`` students trained here with seeds ``seed``, ``seed + 1``, ... (each
    exactly as a baseline run of that seed)."""
    members, record = [], []
    if cfg.ensemble.members:
        for src in cfg.ensemble.members:
            zm = load(Path(src) if Path(src).exists() else src)
            if zm.entry.arch != entry.arch or zm.entry.preprocess != entry.preprocess or zm.entry.task != info.task:
                raise ConfigError(f"ensemble member {src} is {zm.entry.arch} at {zm.entry.preprocess}; "
                                  f"{entry.name} takes {entry.arch} at {entry.preprocess}")
            members.append(zm.net)
            record.append({"source": str(src), "seed": zm.info.get("config", {}).get("seed"),
                           "sha256": state_dict_sha256(zm.net),
                           "val": _metrics(splits["val"], predict_logits(zm.net, splits["val"].images,
                                                                         entry.preprocess), info.task)})
    else:
        for i in range(cfg.ensemble.size):
            seed = cfg.seed + i
            member_cfg = replace(cfg, seed=seed, method="baseline")
            res = _train_student(member_cfg, entry, info, splits, [], env, progress, seed_everything(seed))
            members.append(res.model)
            record.append({"source": f"trained here (baseline recipe, seed {seed})", "seed": seed,
                           "sha256": state_dict_sha256(res.model), "val": res.best_val,
                           "best_epoch": res.best_epoch, "history": res.history})
    return EnsembleClassifier(members).eval(), record


def _search(cfg: MedAlmightyConfig, entry: ZooEntry, info: DatasetInfo, splits: dict[str, Split],
            teachers: list[TeacherOutputs], env: D.DistEnv, progress: bool, gen: torch.Generator
            ) -> tuple[FitResult, dict[str, Any] | None]:
    """The student, or with ``distill.search: grid`` one student per (temperature, alpha) of ``distill.grid``
    (each with the run's seed) and the one with the best validation AUC; test data never choose."""
    if cfg.distill.search == "none" or not teachers:
        return _train_student(cfg, entry, info, splits, teachers, env, progress, gen), None
    state = gen.get_state()  # every candidate draws the batches the first one does
    tried, best = [], None
    for t, a in cfg.distill.grid:
        gen.set_state(state)
        c = replace(cfg, distill=replace(cfg.distill, temperature=float(t), alpha=float(a)))
        res = _train_student(c, entry, info, splits, teachers, env, progress, gen)
        tried.append({"temperature": float(t), "alpha": float(a), "val": res.best_val, "best_epoch": res.best_epoch})
        if best is None or res.best_val["auc"] > best[1].best_val["auc"]:
            best = ((float(t), float(a)), res)
    (t, a), res = best
    return res, {"grid": tried, "chosen": {"temperature": t, "alpha": a}, "by": "validation AUC"}


def _finetune(cfg: MedAlmightyConfig, entry: ZooEntry, info: DatasetInfo, splits: dict[str, Split],
              teacher: TeacherOutputs, progress: bool, gen: torch.Generator) -> FitResult:
    """The ViT teacher trained end to end on the labels (``train`` section), its head starting from the
    linear probe: selected on validation AUC like every classifier here."""
    torch.manual_seed(cfg.seed)
    net = LinearClassifier(teacher.vit.backbone, info.num_outputs)
    net.head.load_state_dict(teacher.head.state_dict())
    net.backbone.requires_grad_(True)  # LinearClassifier freezes it: here it is what trains
    s = splits
    return fit(net, (s["train"].images, s["train"].labels), (s["val"].images, s["val"].labels), task=info.task,
               settings=student_settings(cfg, progress), loss_fn=MedAlmightyLoss(info.task, 1.0, 1.0),
               prep=entry.preprocess, test=(s["test"].images, s["test"].labels), generator=gen, desc=entry.name)


def _train_student(cfg: MedAlmightyConfig, entry: ZooEntry, info: DatasetInfo, splits: dict[str, Split],
                   teachers: list[TeacherOutputs], env: D.DistEnv, progress: bool,
                   gen: torch.Generator) -> FitResult:
    """The student's training (every process of a multi-process run takes part, drawing the same
    batches from ``gen``). One process trains on the CPU, as it always has."""
    torch.manual_seed(cfg.seed)
    net = create_student(entry.arch, info.num_outputs, entry.in_chans, cfg.model.small_stem)
    targets = None
    if cfg.method == "camkd":
        loss = CAMKDLoss(info.task, [t.head for t in teachers], net.get_classifier().in_features, cfg.distill.alpha,
                         cfg.distill.temperature, cfg.distill.feature_weight)
        loss.capture(net.get_classifier())
        targets = MultiTeacher(teachers)
    else:
        alpha = 1.0 if cfg.method == "baseline" else cfg.distill.alpha
        loss = MedAlmightyLoss(info.task, alpha, cfg.distill.temperature)
        targets = teachers[0].logits["train"] if teachers else None
    s = splits
    return fit(net, (s["train"].images, s["train"].labels), (s["val"].images, s["val"].labels), task=info.task,
               settings=student_settings(cfg, progress), loss_fn=loss, prep=entry.preprocess,
               teacher_logits=targets, test=(s["test"].images, s["test"].labels), generator=gen, desc=entry.name,
               env=env if env.world > 1 else None, zero_stage=cfg.distributed.zero_stage)
