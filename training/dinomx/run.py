"""DINO-MX runs end to end: ``zoo pretrain CONFIG`` (a run folder) and ``zoo build dinomx-*`` (a zoo entry).

A run folder ``<output_dir>/<run_name>/`` holds ``checkpoints/last.pt`` while training and, at the
end, ``backbone/`` (Hugging Face format), ``config.json``, ``config.yaml``, ``metrics.json`` and a
card. Restarting the same command resumes from the checkpoint. Zoo entries keep their checkpoints
in ``$ZOO_HOME/.cache/pretrain/<name>/`` and are swapped into the store atomically when done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import ConfigError, load_config
from zoo import store
from zoo.registry import ZooEntry


def _check(cfg: dict[str, Any]) -> None:
    if cfg.get("recipe") != "dinomx":
        raise ConfigError(f"{cfg.get('recipe')} is not a dinomx config; `zoo pretrain` takes configs/dinomx/*.yaml")


def run_name(cfg: dict[str, Any]) -> str:
    flags = cfg["data"]["datasets"]
    flags = [flags] if isinstance(flags, str) else flags
    bb = Path(str(cfg["model"]["backbone"])).name
    return cfg["run_name"] or f"dinomx-{bb}-{'+'.join(flags)}"


def pretrain_config(path: str, overrides: list[str], progress: bool = True) -> tuple[Path, dict[str, Any] | None]:
    """``zoo pretrain``: train into ``<output_dir>/<run_name>/`` (resuming a killed run)."""
    from training.dinomx.train import run

    cfg = load_config(path, overrides=overrides)
    _check(cfg)
    target = Path(cfg["output_dir"]) / run_name(cfg)
    metrics = run(cfg, target, target / "checkpoints", progress=progress)
    return target, metrics


def build_entry(entry: ZooEntry, overrides: list[str], progress: bool = True, config_files: list[str] = ()) -> Path:
    """``zoo build dinomx-*``: pretrain into the store; a killed build resumes from its cached checkpoint."""
    from training.dinomx.train import run

    cfg = load_config(entry.recipe, overrides=list(entry.overrides) + list(overrides), extra_files=config_files)
    _check(cfg)
    cfg["run_name"] = entry.name
    flags = cfg["data"]["datasets"]
    if (flags if isinstance(flags, list) else [flags])[:1] != [entry.dataset]:
        raise ConfigError(f"{entry.name} pretrains on {entry.dataset}; an override set data.datasets={flags}. "
                          "Use `zoo pretrain` for other data")
    if Path(str(cfg["model"]["backbone"])).name != entry.arch:
        raise ConfigError(f"{entry.name} is a {entry.arch} backbone; an override set model.backbone="
                          f"{cfg['model']['backbone']}. Use `zoo pretrain` for other backbones")
    ckpt = store.zoo_home() / ".cache" / "pretrain" / entry.name
    target = store.entry_dir(entry.name)
    with store.staged_dir(target) as tmp:
        m = run(cfg, tmp, ckpt, progress=progress, entry=entry)
        if m is None:
            raise RuntimeError("pretraining stopped before the last step")
    return target
