"""Building zoo entries and runs: the config is derived from the entry, and refused where it would contradict it.

``zoo build NAME`` resolves the entry's recipe, the override files, the entry's pins
(:meth:`zoo.registry.ZooEntry.pins`: preprocessing, label set, architecture, teacher) and the user's
``key=value`` overrides, in that order. An override or file that sets a pinned key to another value is
refused with the variant that has it (a new name), so one name always means one preprocessing. The
recipe (:mod:`training.medalmighty.recipe` or :mod:`training.dinomx.recipe`) writes into a staged
folder that replaces the store's entry only when the build is complete.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zoo.store as store
from training import distributed as D
from training.config import ConfigError, explicit_values, load_config, set_value
from training.dinomx import recipe as dinomx
from training.medalmighty import recipe as medalmighty
from training.medalmighty.config import parse as parse_medalmighty
from zoo.data import dataset_info
from zoo.registry import PROBE_METHODS, ZooEntry, registry


def _describe(key: str, value: Any) -> str:
    return {"model.backbone": f"a {value} backbone", "model.arch": f"a {value} entry", "method": f"a {value} entry",
            "data.dataset": f"a {value} entry", "data.datasets": f"pretrained on {value}"}.get(key, f"{key}={value}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def same_teacher(entry: ZooEntry, got: Any) -> bool:
    """Whether ``teacher.backbone=got`` is the entry's own teacher, given another way.

    Accepted: an existing local directory for a hub teacher (an offline copy of it), and the built
    ``linear-*`` entry of the same hub backbone and dataset (that teacher with its probe already
    trained). The lineage in ``config.json`` and the card record what was used.
    """
    want = entry.teacher
    if not isinstance(got, str) or want is None or want.startswith("dinomx-"):
        return False
    if Path(got).expanduser().is_dir() and "/" in want:
        return True
    other = registry().get(got)
    return other is not None and other.method == "linear" and other.teacher == want and other.dataset == entry.dataset


def check_pins(entry: ZooEntry, asked: dict[str, Any]) -> None:
    """Refuse values the user asked for that contradict the entry, naming the variant to build instead."""
    pins = entry.pins()
    for key, want in pins.items():
        if key not in asked or _same(asked[key], want):
            continue
        got = asked[key]
        if key == "teacher.backbone" and same_teacher(entry, got):
            continue
        if key == "data.datasets" and isinstance(got, str) and [got] == want:
            continue
        others = [e.name for e in registry().values()
                  if e.base_name == entry.base_name and e.name != entry.name and _same(e.pins().get(key), got)]
        old = {"method": "method", "model.arch": "arch", "data.dataset": "dataset"}.get(key)
        hint = (f"build the variant {others[0]} instead" if others else
                f"no registered variant of {entry.base_name} has {key}={got}: use `zoo train` (or `zoo pretrain`) "
                "for a custom run")
        if old:  # the wording the command used before entries had variants
            raise ConfigError(f"{entry.name} is {_describe(key, want)}; an override set {old} to {got}. "
                              f"Build the entry for that instead (zoo list {got}); {hint}")
        raise ConfigError(f"{entry.name} is {_describe(key, want)}; an override set {key}={got}, which would change "
                          f"what the name means; {hint}")


def entry_config(entry: ZooEntry, overrides: Sequence[str], config_files: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config that builds ``entry``: recipe <- files <- pins <- overrides, contradictions refused."""
    check_pins(entry, explicit_values(config_files, overrides))
    cfg = load_config(entry.recipe, overrides=list(entry.overrides) + list(overrides), extra_files=list(config_files))
    for key, value in entry.pins().items():  # the entry's own values win over the recipe's defaults
        if key == "teacher.backbone" and same_teacher(entry, cfg["teacher"]["backbone"]):
            continue  # the entry's teacher given another way (accepted by check_pins)
        set_value(cfg, key, value)
    return cfg


def build_entry(entry: ZooEntry, overrides: Sequence[str], progress: bool = True, config_files: Sequence[str] = ()
                ) -> Path:
    """Build a registered entry into the store (atomically: a failed build leaves the old one).

    A build that trains no step (``train.epochs=0``, ...) is refused before anything is replaced.
    """
    cfg = entry_config(entry, overrides, config_files)
    target = store.entry_dir(entry.name)
    if entry.method == "dinomx":
        return dinomx.build_entry(entry, cfg, target, progress)
    parse_medalmighty(cfg)  # types and ranges, before anything loads or trains
    env = D.init(cfg["distributed"]["strategy"], cfg["distributed"]["backend"])
    if not env.is_main:  # trains its share; the main process writes the entry
        medalmighty.run(cfg, None, entry=entry, progress=False)
        return D.from_main(target, env)
    with store.staged_dir(target) as tmp:
        medalmighty.run(cfg, tmp, entry=entry, progress=progress)
    return D.from_main(target, env)


def train_config(path: str, overrides: Sequence[str], progress: bool = True) -> Path:
    """``zoo train CONFIG``: a run folder ``<output_dir>/<run_name>-<timestamp>``."""
    cfg = load_config(path, overrides=list(overrides))
    if cfg.get("recipe") == "dinomx":  # `zoo train` with a DINO-MX config is `zoo pretrain`
        return dinomx.pretrain_config(path, list(overrides), progress=progress)[0]
    typed = parse_medalmighty(cfg)
    env = D.init(typed.distributed.strategy, typed.distributed.backend)
    recipe = str(path)
    if not env.is_main:  # trains its share; the main process names and writes the run folder
        medalmighty.run(cfg, None, progress=False, recipe=recipe)
        return D.from_main(None, env)
    info = dataset_info(typed.data.dataset)
    arch = typed.model.arch if typed.method not in PROBE_METHODS else "vit"
    name = typed.run_name or f"{typed.method}-{arch}-{info.flag}"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = Path(typed.output_dir) / f"{name}-{stamp}"
    n = 2
    while target.exists():  # two runs in the same second keep both
        target = Path(typed.output_dir) / f"{name}-{stamp}-{n}"
        n += 1
    with store.staged_dir(target) as tmp:
        medalmighty.run(cfg, tmp, progress=progress, recipe=recipe)
    return D.from_main(target, env)
