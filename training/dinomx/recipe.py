"""DINO-MX runs end to end: ``zoo pretrain CONFIG`` (a run folder) and ``zoo build dinomx-*`` (a zoo entry).

:class:`Pretraining` puts the pieces together: the task (:class:`training.dinomx.task.DinoTask`:
models, data, losses), the :mod:`training.distributed` runner, the shared loop
(:class:`training.loop.Loop`) and checkpoints (:mod:`training.checkpoint`). Every random draw of
step ``s`` comes from generators seeded with ``(seed, s)`` and the checkpoint holds everything else,
so a run killed at any point and restarted with the same command continues exactly where its last
checkpoint left it, and ends with the weights of an uninterrupted run.

A run folder ``<output_dir>/<run_name>/`` holds ``checkpoints/last.pt`` while training and, at the
end, ``backbone/`` (Hugging Face format), ``config.json``, ``config.yaml``, ``metrics.json`` and a
card. Zoo entries keep their checkpoints in ``$ZOO_HOME/.cache/pretrain/<name>/`` and are swapped
into the store atomically when done.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import zoo.store as store
from training import checkpoint
from training import distributed as D
from training.config import ConfigError, load_config
from training.dinomx.config import DinoMXConfig, parse
from training.dinomx.data import PretrainData, data_channels, load_data
from training.dinomx.evaluate import evaluate_backbone
from training.dinomx.model import param_groups, peak_memory_mb
from training.dinomx.task import HEADS_CONFIG, HEADS_FILE, DinoTask, count_trainable
from training.loop import Loop, LoopState
from training.outputs import write_config, write_results
from zoo.backbones import count_parameters
from zoo.data import dataset_info
from zoo.registry import ZooEntry

LOG_KEYS = ("loss", "dino", "ibot", "koleo", "gram", "distill")
# The collapse monitor's figures in the progress bar (monitor.py): teacher entropy, prototypes in use, CLS cosine.
BAR_MONITOR = {"teacher_entropy": "H_t", "eff_prototypes": "K_eff", "cls_cos": "cos"}


class Pretraining:
    """One DINO-MX run: the task, its runner and loop, and the run's state (see the module doc)."""

    def __init__(self, raw: dict[str, Any], data: PretrainData | None = None, env: D.DistEnv | None = None):
        self.raw = raw
        self.cfg: DinoMXConfig = parse(raw)
        cfg = self.cfg
        self.env = env or D.init(cfg.distributed.strategy, cfg.distributed.backend)
        self.data = data if data is not None else load_data(cfg, data_channels(cfg))
        self.task = DinoTask(cfg, self.data, self.env)
        t = self.task
        self.params = count_parameters(t.student)
        encoder = t.student.encoder
        self.params["backbone_trainable"] = count_trainable(encoder)
        self.params["backbone_total"] = sum(p.numel() for p in encoder.parameters())
        self.runner = D.wrap(self.env, t.student,
                             lambda groups: torch.optim.AdamW(groups, lr=cfg.optim.peak_lr, betas=(0.9, 0.999)),
                             lambda mod: param_groups(mod, cfg.optim.layer_decay), raw)
        if cfg.optim.compile:
            self.runner.module = torch.compile(self.runner.module)
        t.attach(self.runner)
        self.loop = Loop(self.runner, t.lr, self.env, weight_decay=t.wd, clip_grad=cfg.optim.clip_grad)
        self.state = LoopState()
        if self.env.device.type == "cuda":  # the run's peak, from the models and optimizer on
            torch.cuda.reset_peak_memory_stats(self.env.device)

    # Read by tests, benchmarks and reports.
    @property
    def student(self):
        return self.task.student

    @property
    def teacher(self):
        return self.task.teacher

    @property
    def in_chans(self) -> int:
        return self.task.in_chans

    @property
    def total(self) -> int:
        return self.task.total

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state.history

    @property
    def distill_mode(self) -> str:
        return self.task.distill_mode

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: Path) -> None:
        st = {"step": self.state.step, **self.task.state_dict(), "optimizer": self.runner.optimizer_state(),
              "history": self.state.history, "seconds": self.state.seconds,
              "images_seen": self.state.images_seen, "config_sha": config_sha(self.raw)}
        if self.env.is_main:  # building the state is collective under sharded strategies; one process writes
            checkpoint.save(ckpt_dir / "last.pt", st)
        D.barrier(self.env)

    def try_resume(self, ckpt_dir: Path) -> bool:
        p = ckpt_dir / "last.pt"
        if not (self.cfg.checkpoint.resume and (p.exists() or p.is_symlink())):
            return False
        self._load(p, config_sha(self.raw), "the checkpoint was written by a run with another config; delete it or "
                   "set checkpoint.resume=false (or use another run_name)")
        return True

    def branch(self, path: Path, parent: dict[str, Any]) -> None:
        """Continue from another run's checkpoint (``path``, a ``last.pt``) written by this run's config with
        the dotted keys of ``parent`` set as given, e.g. ``{"crops.label_guided": 0.0}``.

        Two runs branched from one checkpoint share everything up to it (student, teacher, heads,
        optimizer state, loss centers, schedule position) and differ after it only in ``parent``'s
        keys: a paired comparison (``benchmarks/dinomx_pointing.py`` branches both arms from one
        unguided warm-up). The schedules are those of the whole run, so the parent must have been
        run with the same number of steps and stopped early (``fit(stop_after=...)``).
        """
        raw = json.loads(json.dumps(self.raw))
        for key, value in parent.items():
            *heads, last = key.split(".")
            node = raw
            for h in heads:
                node = node[h]
            if last not in node:
                raise ConfigError(f"{key} is not a config key")
            node[last] = value
        self._load(path, config_sha(raw), f"{path} was not written by this config with {parent}")

    def _load(self, p: Path, sha: str, mismatch: str) -> None:
        st = checkpoint.load(p, {"step": int, "student": dict, "teacher": dict, "optimizer": dict, "history": list,
                                 "seconds": (int, float), "images_seen": int, "config_sha": str},
                             total_steps=self.total)
        if st["config_sha"] != sha:
            raise ConfigError(mismatch)
        self.task.load_state_dict(st)
        self.runner.load_optimizer_state(st["optimizer"])
        self.state = LoopState(int(st["step"]), list(st["history"]), float(st["seconds"]), int(st["images_seen"]))
        for row in self.state.history:  # the monitor picks up where the checkpoint's run was
            self.task.monitor.observe(row)

    # -- training -----------------------------------------------------------------------------
    def fit(self, ckpt_dir: Path | None = None, progress: bool = True, stop_after: int | None = None) -> None:
        cfg = self.cfg
        every, log_every = cfg.checkpoint.every, max(1, cfg.log.every)
        bar = tqdm(total=self.total, initial=self.state.step, desc="dinomx", unit="step",
                   disable=not (progress and self.env.is_main))

        def on_step(done: int, out: dict[str, torch.Tensor], grad_norm: float) -> None:
            row = D.average({**out, **self.task.monitor_values}, self.env)  # global-batch values, one all-reduce
            row.update(self.task.last_row, grad_norm=grad_norm)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in LOG_KEYS if k in row}
                            | {short: f"{row[k]:.3g}" for k, short in BAR_MONITOR.items() if k in row}
                            | {"t_temp": f"{row['teacher_temp']:.3f}", "mom": f"{row['momentum']:.4f}"})
            if done % log_every == 0 or done == self.total:
                entry = {"step": done, **{k: round(v, 6) for k, v in row.items()},
                         "seconds": round(self.state.seconds, 2)}
                self.state.history.append(entry)
                warning = self.task.monitor.observe(entry)
                if warning and self.env.is_main:
                    tqdm.write(warning, file=sys.stderr)
            if ckpt_dir is not None and every > 0 and (done % every == 0 or done == self.total):
                self.save_checkpoint(ckpt_dir)

        self.runner.module.train()
        self.loop.run(self.task, self.state, images_per_step=self.task.batch, stop_after=stop_after, on_step=on_step)
        bar.close()
        self.runner.module.eval()

    def collapse(self) -> dict[str, Any]:
        """The collapse monitor's verdict on the run so far (``metrics.json``'s ``collapse`` section)."""
        return self.task.monitor.summary(self.state.history)

    def report(self) -> dict[str, Any]:
        s = self.state
        return {"parameters": self.params, "peak_memory_mb": round(peak_memory_mb(self.env.device), 1),
                "images_per_s": round(s.images_seen / s.seconds, 2) if s.seconds else None,
                "steps": s.step, "train_seconds": round(s.seconds, 2), "world_size": self.env.world,
                "strategy": self.env.strategy, "device": str(self.env.device)}

    def save_outputs(self, out: Path) -> dict[str, Any]:
        """Backbone in HF format (``out/backbone``) from the EMA teacher (as DINO does), plus its heads."""
        prep = self.task.save_backbone(out)
        save_file(prep.pop("heads"), out / "backbone" / HEADS_FILE)
        (out / "backbone" / HEADS_CONFIG).write_text(json.dumps(prep.pop("heads_config"), indent=2) + "\n")
        return prep


def config_sha(cfg: dict[str, Any]) -> str:
    """What must match for a checkpoint to continue a run (progress/log/eval settings may change)."""
    c = {k: v for k, v in cfg.items() if k not in ("log", "eval", "checkpoint", "run_name", "output_dir")}
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name(cfg: dict[str, Any]) -> str:
    flags = cfg["data"]["datasets"]
    flags = [flags] if isinstance(flags, str) else flags
    bb = Path(str(cfg["model"]["backbone"])).name
    return cfg["run_name"] or f"dinomx-{bb}-{'+'.join(flags)}"


def run_entry(cfg: DinoMXConfig, prep: dict[str, Any], names: tuple[str, ...], name: str) -> ZooEntry | None:
    """The entry a ``zoo pretrain`` run produces (no registry name): read from the run."""
    if not names:
        return None
    info = dataset_info(names[0])
    return ZooEntry(name=name, method="dinomx", arch=str(cfg.model.backbone), dataset=names[0], task=info.task,
                    labels=info.labels, in_chans=prep["in_chans"], input_size=prep["input_size"],
                    mean=prep["mean"], std=prep["std"], recipe="dinomx/default.yaml", license=info.license,
                    data_size=cfg.data.size)


def run(raw: dict[str, Any], out: Path, ckpt_dir: Path, progress: bool = True, data: PretrainData | None = None,
        entry: ZooEntry | None = None, stop_after: int | None = None) -> dict[str, Any] | None:
    """Pretrain as the resolved config ``raw`` says, resuming from ``ckpt_dir``; write outputs into ``out``.

    Returns the metrics (main process) or None (other processes, or when stopped early by ``stop_after``).
    """
    t_start = time.perf_counter()
    raw = json.loads(json.dumps(raw))
    pt = Pretraining(raw, data)
    cfg = pt.cfg
    progress = progress and cfg.log.progress
    resumed = pt.try_resume(ckpt_dir)
    if resumed and pt.env.is_main and progress:
        print(f"resuming from {ckpt_dir / 'last.pt'} at step {pt.state.step}/{pt.total}", flush=True)
    pt.fit(ckpt_dir, progress, stop_after)
    if pt.state.step < pt.total:
        return None
    report = pt.report()
    if not pt.env.is_main:
        D.barrier(pt.env)
        return None
    out.mkdir(parents=True, exist_ok=True)
    prep = pt.save_outputs(out)
    ev = evaluate_backbone(out / "backbone", cfg, prep, progress=progress) if data is None else {}
    lineage = {"backbone_source": cfg.model.backbone, "datasets": list(pt.data.names),
               "distill_teacher": cfg.strategy.distill.teacher, "resumed": resumed}
    if entry is not None:  # the run's preprocessing is the entry's (its pins made the config)
        got = (prep["in_chans"], prep["input_size"], tuple(prep["mean"]), tuple(prep["std"]))
        want = (entry.in_chans, entry.input_size, entry.mean, entry.std)
        if got != want:
            raise RuntimeError(f"{entry.name}: the run's preprocessing {got} differs from the entry's {want}")
    else:
        entry = run_entry(cfg, prep, pt.data.names, raw["run_name"] or run_name(raw))
    config = write_config(out, entry, raw, lineage)
    collapse = pt.collapse()
    if collapse["collapsed"] and collapse["first_warning_step"] is None:  # not warned during the run
        print(f"warning: DINO-MX run ended collapsed: {collapse['verdict']}. To fix: {collapse['advice']}.",
              file=sys.stderr, flush=True)
    metrics = {**ev, "report": report, "collapse": collapse, "seed": cfg.seed, "history": pt.history,
               "wall_time_s": round(time.perf_counter() - t_start, 2)}
    write_results(out, entry, config, metrics)
    D.barrier(pt.env)
    return metrics


def pretrain_config(path: str, overrides: list[str], progress: bool = True) -> tuple[Path, dict[str, Any] | None]:
    """``zoo pretrain``: train into ``<output_dir>/<run_name>/`` (resuming a killed run)."""
    cfg = load_config(path, overrides=overrides)
    parse(cfg)
    target = Path(cfg["output_dir"]) / run_name(cfg)
    metrics = run(cfg, target, target / "checkpoints", progress=progress)
    return target, metrics


def build_entry(entry: ZooEntry, cfg: dict[str, Any], target: Path, progress: bool = True) -> Path:
    """``zoo build dinomx-*`` from its resolved config: pretrain into the store; a killed build resumes
    from its cached checkpoint."""
    cfg["run_name"] = entry.name
    parse(cfg)
    ckpt = store.zoo_home() / ".cache" / "pretrain" / entry.name
    with store.staged_dir(target) as tmp:
        m = run(cfg, tmp, ckpt, progress=progress, entry=entry)
        if m is None:
            raise RuntimeError("pretraining stopped before the last step")
    return target
