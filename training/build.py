"""Recipes end to end: config -> trained model -> a zoo entry folder (weights, config, metrics, card).

``zoo build NAME`` writes into ``$ZOO_HOME/NAME``; ``zoo train CONFIG`` writes a run folder under
``output_dir``. Both folders have the same layout and both load with ``zoo.load(path)``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from training import distributed as D
from training.config import ConfigError, dump_config, load_config
from training.loop import fit, seed_everything
from training.losses import MedAlmightyLoss
from training.teacher import Teacher, features, load_teacher, teacher_logits, train_probe
from zoo import store
from zoo.api import evaluate, load
from zoo.card import render_card
from zoo.data import SPLITS, Preprocess, dataset_info, load_split, per_channel
from zoo.inference import logits_to_probs
from zoo.metrics import compute_metrics
from zoo.models import LinearClassifier, create_student
from zoo.registry import MEDMNIST_MEAN, MEDMNIST_STD, METHODS, STUDENT_ARCHS, TEST_ARCHS, ZooEntry


def _check(cfg: dict[str, Any]) -> None:
    if cfg["method"] not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg['method']!r}")
    archs = STUDENT_ARCHS + TEST_ARCHS
    if cfg["method"] != "linear" and cfg["model"]["arch"] not in archs:
        raise ConfigError(f"model.arch must be one of {', '.join(archs)}, got {cfg['model']['arch']!r}")
    dc = cfg["distributed"]
    if dc["strategy"] not in D.STRATEGIES:
        raise ConfigError(f"distributed.strategy must be one of {', '.join(D.STRATEGIES)}, got {dc['strategy']!r}")
    if dc["strategy"] == "deepspeed" and int(dc["zero_stage"]) not in (1, 2, 3):
        raise ConfigError(f"distributed.zero_stage must be 1, 2 or 3, got {dc['zero_stage']!r}")
    dataset_info(cfg["data"]["dataset"])  # unknown flags fail here, with suggestions


def entry_for(cfg: dict[str, Any], base: ZooEntry | None, teacher: Teacher | None,
              recipe: str = "medalmighty/default.yaml") -> ZooEntry:
    """The entry a run produces: the registry entry (if any) with the run's actual preprocessing."""
    info = dataset_info(cfg["data"]["dataset"])
    method = cfg["method"]
    if method == "linear":
        assert teacher is not None
        p = teacher.prep
        arch = base.arch if base else "vit"
        lineage = teacher.source
    else:
        c = info.n_channels
        mean = per_channel(cfg["data"]["mean"] or MEDMNIST_MEAN, c)
        std = per_channel(cfg["data"]["std"] or MEDMNIST_STD, c)
        p = Preprocess(int(cfg["data"]["input_size"]), c, tuple(mean), tuple(std), cfg["data"]["resize"])
        arch = cfg["model"]["arch"]
        lineage = teacher.source if teacher is not None else None
    name = base.name if base else (cfg["run_name"] or f"{method}-{arch}-{info.flag}")
    fields = dict(name=name, method=method, arch=arch, dataset=info.flag, task=info.task, labels=info.labels,
                  in_chans=p.in_chans, input_size=p.input_size, mean=tuple(p.mean), std=tuple(p.std),
                  resize=p.resize, teacher=lineage, license=info.license)
    if base is not None:
        return dataclasses.replace(base, **fields)
    return ZooEntry(recipe=recipe, **fields)


def _env(cfg: dict[str, Any]) -> D.DistEnv:
    return D.init(cfg["distributed"]["strategy"], cfg["distributed"]["backend"])


def _from_main(value: Any, env: D.DistEnv) -> Any:
    """The main process's ``value`` on every process; it also waits for the main process to get here."""
    if env.world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(cfg: dict[str, Any], out: Path | None, base: ZooEntry | None = None, progress: bool = True,
        recipe: str = "medalmighty/default.yaml") -> dict[str, Any] | None:
    """Train what ``cfg`` describes and write the entry files into the folder ``out``.

    Under ``torchrun`` every process trains its share of each batch; only the main process writes
    (``out`` may be None elsewhere) and gets the metrics; the others return None.
    """
    _check(cfg)
    env = _env(cfg)
    t_start = time.perf_counter()
    cfg = json.loads(json.dumps(cfg))  # a plain copy; it is saved verbatim
    cfg["train"]["progress"] = cfg["train"]["progress"] and progress
    progress = cfg["train"]["progress"] and env.is_main
    method, d = cfg["method"], cfg["data"]
    info = dataset_info(d["dataset"])
    splits = {s: load_split(info.flag, s, size=int(d["size"]), root=d["root"], download=d["download"]) for s in SPLITS}
    gen = seed_everything(int(cfg["seed"]))

    teacher = head = probe = logits = None
    lineage: dict[str, Any] = {}
    if method in ("linear", "medalmighty"):
        teacher = load_teacher(cfg)
        feats = features(teacher, splits, cfg, progress)
        if teacher.head is not None:
            head = teacher.head
        else:
            head, probe = train_probe(feats, splits, info.task, info.num_outputs, cfg, gen, progress)
        lineage = {"teacher_backbone": teacher.source, "teacher_sha256": teacher.sha256,
                   "teacher_input_size": teacher.prep.input_size, "pooling": teacher.backbone.pooling}
        if method == "medalmighty":
            logits = teacher_logits(teacher, head, feats, cfg)
            lineage["teacher_metrics"] = {
                s: compute_metrics(splits[s].labels.numpy(), logits_to_probs(logits[s], info.task).numpy(), info.task)
                for s in ("val", "test")
            }

    entry = entry_for(cfg, base, teacher, recipe)
    if not env.is_main:  # the other processes only share the student's training
        if method != "linear":
            _train_student(cfg, entry, info, splits, logits, env, progress, gen)
        return None
    out.mkdir(parents=True, exist_ok=True)
    if method == "linear":
        net = LinearClassifier(teacher.backbone, info.num_outputs)
        net.head.load_state_dict(head.state_dict())
        history, best_epoch = (probe.history, probe.best_epoch) if probe else ([], 0)
        teacher.backbone.model.save_pretrained(out / "backbone", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in net.head.state_dict().items()}, out / "model.safetensors")
    else:
        res = _train_student(cfg, entry, info, splits, logits, env, progress, gen)
        history, best_epoch = res.history, res.best_epoch
        save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()}, out / "model.safetensors")
        if head is not None:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "teacher_head.safetensors")

    sha = {str(p.relative_to(out)): store.sha256_file(p) for p in store.weight_files(out)}
    config = {"format": 1, "entry": entry.to_dict(), "config": cfg, "sha256": sha, "lineage": lineage,
              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    store.write_json_atomic(out / "config.json", config)
    (out / "config.yaml").write_text(dump_config(cfg))

    # The card's figures come from the saved files through the user's path: load + predict.
    model = load(out)
    results = {s: evaluate(model, s) for s in ("val", "test")}
    metrics = {
        "val": {k: results["val"][k] for k in ("acc", "auc")},
        "test": {k: results["test"][k] for k in ("acc", "auc")},
        "seed": int(cfg["seed"]), "best_epoch": best_epoch, "epochs": len(history),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
        "train_time_s": round(sum(h["epoch_train_s"] for h in history), 2),
        "history": history,
    }
    if lineage.get("teacher_metrics"):
        metrics["teacher"] = lineage["teacher_metrics"]
    store.write_json_atomic(out / "metrics.json", metrics)
    (out / "README.md").write_text(render_card(entry, config, metrics))
    return metrics


def _train_student(cfg: dict[str, Any], entry: ZooEntry, info, splits, logits, env: D.DistEnv, progress: bool,
                   gen: torch.Generator):
    """The student's training (every process of a multi-process run takes part, drawing the same
    batches from ``gen``). One process trains on the CPU, as it always has."""
    method = cfg["method"]
    torch.manual_seed(int(cfg["seed"]))
    net = create_student(entry.arch, info.num_outputs, entry.in_chans, cfg["model"]["small_stem"])
    alpha = 1.0 if method == "baseline" else float(cfg["distill"]["alpha"])
    loss = MedAlmightyLoss(info.task, alpha, float(cfg["distill"]["temperature"]))
    s = splits
    return fit(net, (s["train"].images, s["train"].labels), (s["val"].images, s["val"].labels), task=info.task,
               cfg=cfg["train"], loss_fn=loss, prep=entry.preprocess,
               teacher_logits=logits["train"] if logits is not None else None,
               test=(s["test"].images, s["test"].labels), generator=gen, desc=entry.name,
               env=env if env.world > 1 else None, distributed=cfg["distributed"])


def build_entry(entry: ZooEntry, overrides: list[str], progress: bool = True, config_files: list[str] = ()
                ) -> Path:
    """Build a registered entry into the store (atomically: a failed build leaves the old one).

    The config is the entry's recipe, then ``config_files`` (e.g. ``medalmighty/cpu-fast.yaml``), then
    the entry's pinned ``key=value`` (method, arch, dataset), then ``overrides``.
    """
    cfg = load_config(entry.recipe, overrides=list(entry.overrides) + list(overrides), extra_files=config_files)
    pinned = {"method": entry.method, "dataset": entry.dataset}
    got = {"method": cfg["method"], "dataset": cfg["data"]["dataset"]}
    if entry.is_student:
        pinned["arch"], got["arch"] = entry.arch, cfg["model"]["arch"]
    for k in pinned:
        if pinned[k] != got[k]:
            raise ConfigError(f"{entry.name} is a {pinned[k]} entry; an override set {k} to {got[k]}. "
                              f"Build the entry for that instead (zoo list {got[k]})")
    target = store.entry_dir(entry.name)
    _check(cfg)
    env = _env(cfg)
    if not env.is_main:  # trains its share; the main process writes the entry
        run(cfg, None, base=entry, progress=False)
        return _from_main(target, env)
    with store.staged_dir(target) as tmp:
        run(cfg, tmp, base=entry, progress=progress)
    return _from_main(target, env)


def train_config(path: str, overrides: list[str], progress: bool = True) -> Path:
    """``zoo train CONFIG``: a run folder ``<output_dir>/<run_name>-<timestamp>``."""
    cfg = load_config(path, overrides=overrides)
    if cfg.get("recipe") == "dinomx":  # `zoo train` with a DINO-MX config is `zoo pretrain`
        from training.dinomx.run import pretrain_config

        return pretrain_config(path, overrides, progress=progress)[0]
    _check(cfg)
    env = _env(cfg)
    recipe = str(path)
    if not env.is_main:  # trains its share; the main process names and writes the run folder
        run(cfg, None, base=None, progress=False, recipe=recipe)
        return _from_main(None, env)
    info = dataset_info(cfg["data"]["dataset"])
    arch = cfg["model"]["arch"] if cfg["method"] != "linear" else "vit"
    name = cfg["run_name"] or f"{cfg['method']}-{arch}-{info.flag}"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(cfg["output_dir"]) / f"{name}-{stamp}"
    n = 2
    while target.exists():  # two runs in the same second keep both
        target = Path(cfg["output_dir"]) / f"{name}-{stamp}-{n}"
        n += 1
    with store.staged_dir(target) as tmp:
        run(cfg, tmp, base=None, progress=progress, recipe=recipe)
    return _from_main(target, env)
