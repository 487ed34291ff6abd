"""MedAlmighty's Table 2 (and Table 4) on our data: students, teachers and distilled students over seeds, resumable.

Every cell of the table is one *run*: a zoo entry (or, for CA-MKD, a ``zoo train`` run) built with
its recipe and a seed into a store of its own (``<store>/<method>/seed<k>/``). Each finished run
writes one small JSON file into ``benchmarks/results/medalmighty/runs/`` (val/test ACC and AUC, the
recipe, the teacher's figures and strength check, the test predictions packed for paired
statistics, the commit of the code); a run whose file exists is never run again, so a stopped
session loses at most the run in progress. Runs a method needs (the plain students an ensemble
teacher is assembled from) are run first::

    python -m benchmarks.medalmighty_table2 run --methods plain kd-ens --datasets breastmnist --seeds 0 1 2
    python -m benchmarks.medalmighty_table2 report      # results/medalmighty_table2.{json,md}

The methods are the rows of :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import shutil
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoo.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Result files of the runs; another folder can be named (a second checkout writing into this one).
RUNS = Path(os.environ.get("MEDALMIGHTY_RUNS", RESULTS / "medalmighty" / "runs"))
LOCAL = ["breastmnist", "pneumoniamnist", "bloodmnist", "organamnist"]
PAPER = "medalmighty/cpu-fast.yaml"  # the paper's recipe (no augmentation) on a CPU schedule
AUG = "medalmighty/cpu-aug.yaml"     # the same schedule with light augmentation and a weight EMA
DINOMX = "dinomx/cpu.yaml"           # DINO-MX pretraining on a CPU (vit-mini-p4, 28 px)
MEMBER_SEEDS = (0, 1, 2)             # the plain students an ensemble (or CA-MKD's teachers) is made of


@dataclass(frozen=True)
class Method:
    """One row of the table: how its run is named, built and compared.

    Attributes:
        name: the zoo entry (``{arch}``, ``{flag}`` filled in), or for ``kind="train"`` the run's prefix.
        plain: the method a distilled row is compared with (paired by seed), e.g. ``plain``.
        members: the method whose seeds make the teacher (an ensemble or CA-MKD's teachers).
        needs: methods whose (unseeded) entries this run needs in its store (a DINO-MX backbone under a
            fine-tuned teacher); for CA-MKD with ``needs`` they are its teachers instead of ``members``.
        seeded: False for rows without a seed of their own (an ensemble assembled from seeds 0-2, a
            teacher that every student seed shares).
    """

    key: str
    label: str
    name: str
    config_files: tuple[str, ...] = (PAPER,)
    overrides: tuple[str, ...] = ()
    kind: str = "build"  # build: `zoo build name`; train: `zoo train` (CA-MKD's teachers are folders); backbone
    plain: str | None = None
    members: str | None = None
    needs: tuple[str, ...] = ()
    seeded: bool = True
    note: str = ""


def _camkd(key: str, label: str, files: tuple[str, ...], members: str, plain: str) -> Method:
    return Method(key, label, "camkd-{arch}-{flag}", files, ("method=camkd",), kind="train", plain=plain,
                  members=members, note="CA-MKD (Zhang et al. 2022) from the 3 plain students as teachers")


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("plain", "ResNet alone (paper recipe, no augmentation)", "baseline-{arch}-{flag}",
           note="the student trained on the labels alone: MedAlmighty's baseline (alpha = 1)"),
    Method("plain-aug", "ResNet alone, light augmentation + EMA", "baseline-{arch}-{flag}", (AUG,), plain="plain"),
    Method("ensemble", "teacher: ensemble of the 3 plain students", "ensemble-{arch}-{flag}", members="plain",
           seeded=False, note="logits averaged; not the paper's method"),
    Method("ensemble-aug", "teacher: ensemble of the 3 augmented students", "ensemble-{arch}-{flag}", (AUG,),
           members="plain-aug", seeded=False),
    Method("kd-ens", "distilled from the ensemble (paper recipe)", "medalmighty-{arch}-{flag}.ens-28",
           members="plain", plain="plain"),
    Method("kd-ens-aug", "distilled from the augmented ensemble, light augmentation + EMA",
           "medalmighty-{arch}-{flag}.ens-28", (AUG,), members="plain-aug", plain="plain-aug"),
    Method("kd-ens-grid", "distilled from the ensemble, (t, a) chosen on validation",
           "medalmighty-{arch}-{flag}.ens-28", (PAPER,), ("distill.search=grid",), members="plain", plain="plain"),
    _camkd("camkd", "CA-MKD from the 3 plain students (paper recipe)", (PAPER,), "plain", "plain"),
    _camkd("camkd-aug", "CA-MKD from the 3 augmented students, light augmentation + EMA", (AUG,), "plain-aug",
           "plain-aug"),
    Method("dinomx", "DINO-MX ViT-mini/4 backbone: kNN (k = 11) on its features", "dinomx-vit-mini-p4-{flag}",
           (DINOMX,), kind="backbone", seeded=False, note="self-supervised on the dataset's training images"),
    Method("finetune", "teacher: the DINO-MX backbone fine-tuned with the labels", "finetune-vit-mini-p4-{flag}", (),
           needs=("dinomx",), seeded=False, note="not the paper's frozen teacher"),
    Method("kd-dinomx", "distilled from DINO-MX + linear (the paper's frozen teacher, offline)",
           "medalmighty-{arch}-{flag}.dinomx-28", needs=("dinomx",), plain="plain"),
    Method("kd-ft", "distilled from the fine-tuned DINO-MX teacher", "medalmighty-{arch}-{flag}.ft-28",
           needs=("finetune",), plain="plain"),
    Method("camkd-ens-ft", "CA-MKD from the ensemble and the fine-tuned DINO-MX teacher", "camkd-{arch}-{flag}",
           (PAPER,), ("method=camkd",), kind="train", plain="plain", needs=("ensemble", "finetune")),
    *(Method(f"kd-ens-t{t:g}-a{a:g}", f"distilled from the ensemble, t = {t:g}, a = {a:g} (Table 4)",
             "medalmighty-{arch}-{flag}.ens-28", (PAPER,), (f"distill.temperature={t}", f"distill.alpha={a}"),
             members="plain", plain="plain") for t, a in ((5.0, 0.5), (8.0, 0.8))),  # (2, 0.2) is kd-ens
)}


def run_id(method: str, arch: str, flag: str, seed: int) -> str:
    return f"{method}-{arch}-{flag}-seed{seed}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pack_predictions(probs: np.ndarray, task: str) -> str:
    """Test predictions, compressed: class indices (single-label) or 0/1 per label (multi-label)."""
    t = get_task(task)
    if t.multilabel:
        arr = np.packbits(t.positives(probs).astype(np.uint8), axis=1)
    else:
        arr = t.decide(probs).astype(np.uint8)
    return base64.b64encode(zlib.compress(arr.tobytes(), 9)).decode()


def unpack_predictions(s: str, n: int) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), dtype=np.uint8)[:n]


# ----------------------------------------------------------------------------------------- running


@dataclass
class Runner:
    """Runs cells (and the cells they need) into ``store_root``; writes each result file once."""

    arch: str
    store_root: Path
    quiet: bool = True
    log: Callable[[str], None] = field(default=lambda m: print(m, flush=True))

    def store(self, key: str, seed: int) -> Path:
        # The first runs of this benchmark kept the plain students in <store>/seed<k>.
        legacy = self.store_root / f"seed{seed}"
        if key == "plain" and legacy.is_dir() and not (self.store_root / key).exists():
            return legacy
        return self.store_root / key / f"seed{seed}"

    def entry_dir(self, key: str, flag: str, seed: int) -> Path:
        m = METHODS[key]
        return self.store(key, seed) / m.name.format(arch=self.arch, flag=flag)

    def result(self, key: str, flag: str, seed: int) -> Path:
        return RUNS / f"{run_id(key, self.arch, flag, seed if METHODS[key].seeded else 0)}.json"

    def ensure(self, key: str, flag: str, seed: int, need_entry: bool = False) -> dict:
        """The result of a cell, running it (and the cells it needs) when it has not run. ``need_entry``: its
        entry must also be in the store (a member of a teacher). A cell whose result is recorded but whose
        store is gone (an earlier session's) is rebuilt; the rebuild need not reproduce the recorded run
        (other library builds or code since), so its figures go to ``runs/rebuilt/`` and a difference is
        warned about, while the recorded result stays the table's."""
        m = METHODS[key]
        seed = seed if m.seeded else 0
        out = self.result(key, flag, seed)
        if self.done(key, flag, seed, need_entry):
            return json.loads(out.read_text())
        members = []
        if m.members:
            for s in MEMBER_SEEDS:
                self.ensure(m.members, flag, s, need_entry=True)
                members.append(self.entry_dir(m.members, flag, s))
        for need in m.needs:
            self.ensure(need, flag, 0, need_entry=True)
        t0 = time.perf_counter()
        row = self._run(m, flag, seed, members)
        from zoo.store import write_json_atomic

        if not out.is_file():
            write_json_atomic(out, row)
        else:  # a rebuilt member: the recorded result stays; a different figure means the rebuild is not that run
            write_json_atomic(RUNS / "rebuilt" / f"{out.stem}.{row.get('commit', 'unknown')[:7]}.json", row)
            before = json.loads(out.read_text())["test"]
            if abs(before["acc"] - row["test"]["acc"]) > 1e-9 or abs(before["auc"] - row["test"]["auc"]) > 1e-6:
                self.log(f"WARNING {out.stem}: rebuilt with test acc {row['test']['acc']:.4f} auc "
                         f"{row['test']['auc']:.4f}, recorded {before['acc']:.4f} / {before['auc']:.4f}; the recorded "
                         "result is kept, but teachers built from this store are not the recorded run's")
        self.log(f"{out.stem}: test acc {row['test']['acc']:.4f} auc {row['test']['auc']:.4f} "
                 f"({time.perf_counter() - t0:.0f} s)")
        return row

    def done(self, key: str, flag: str, seed: int, need_entry: bool = False) -> bool:
        """Its result is recorded (and, with ``need_entry``, its entry is in the store)."""
        seed = seed if METHODS[key].seeded else 0
        return self.result(key, flag, seed).is_file() and not (need_entry and not self._built(key, flag, seed))

    def _built(self, key: str, flag: str, seed: int) -> bool:
        return (self.entry_dir(key, flag, seed) / "config.json").is_file()

    def _run(self, m: Method, flag: str, seed: int, members: list[Path]) -> dict:
        from zoo.api import build, evaluate, load

        store = self.store(m.key, seed)
        os.environ["ZOO_HOME"] = str(store)
        name = m.name.format(arch=self.arch, flag=flag)
        overrides = [*m.overrides, f"seed={seed}"]
        t0 = time.perf_counter()
        needed = [self.entry_dir(n, flag, 0) for n in m.needs]
        if m.kind == "train" and needed:  # CA-MKD from other teachers than plain students
            members = needed
        elif needed:  # the entries it is built from, by name in its own store
            for src in needed:
                if not (store / src.name / "config.json").is_file():
                    shutil.copytree(src, store / src.name, dirs_exist_ok=True)
        if m.kind == "backbone":
            d = build(name, overrides, progress=not self.quiet, config_files=list(m.config_files))
            return self._backbone_row(m, flag, seed, name, d, overrides, t0)
        if m.key.startswith("ensemble"):
            overrides.append(f"ensemble.members=[{', '.join(map(str, members))}]")
        elif m.members and m.kind == "build":  # the teacher entry (an ensemble) goes into this store first
            teacher = f"ensemble-{self.arch}-{flag}"
            build(teacher, [f"ensemble.members=[{', '.join(map(str, members))}]"], progress=False,
                  config_files=list(m.config_files))
        if m.kind == "train":
            from training.entries import train_config

            d = train_config(m.config_files[0], [*overrides, f"data.dataset={flag}", f"model.arch={self.arch}",
                                                 f"teacher.backbone=[{', '.join(map(str, members))}]",
                                                 f"output_dir={store}", f"run_name={name}", "train.progress=false"],
                             progress=not self.quiet)
        else:
            d = build(name, overrides, progress=not self.quiet, config_files=list(m.config_files))
        metrics = json.loads((d / "metrics.json").read_text())
        config = json.loads((d / "config.json").read_text())
        test = evaluate(load(d), "test")
        task = config["entry"]["task"]
        return {
            "run": self.result(m.key, flag, seed).stem, "method": m.key, "arch": self.arch, "dataset": flag,
            "seed": seed, "entry": name, "folder": str(d), "config_files": list(m.config_files),
            "overrides": overrides, "val": metrics["val"], "test": metrics["test"],
            "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"], "train_time_s": metrics["train_time_s"],
            "wall_time_s": round(time.perf_counter() - t0, 1), "teacher": metrics.get("teacher"),
            "teacher_gate": metrics.get("teacher_gate"), "search": metrics.get("search"),
            "members": [str(p) for p in members], "lineage": config.get("lineage"), "task": task,
            "n_test": int(test["n"]), "test_pred": pack_predictions(test["probs"], task),
            "commit": _commit(), "torch_threads": _threads(), "machine": platform.machine(),
        }


    def _backbone_row(self, m: Method, flag: str, seed: int, name: str, d: Path, overrides: list[str],
                      t0: float) -> dict:
        """A DINO-MX backbone's row: its kNN figures (and the linear probe's, when its build ran one)."""
        metrics = json.loads((d / "metrics.json").read_text())
        knn = metrics["knn"][flag]
        return {
            "run": self.result(m.key, flag, seed).stem, "method": m.key, "arch": self.arch, "dataset": flag,
            "seed": seed, "entry": name, "folder": str(d), "config_files": list(m.config_files),
            "overrides": overrides, "val": knn["val"], "test": knn["test"], "knn": metrics["knn"],
            "linear": metrics.get("linear"), "eval": metrics.get("eval"), "report": metrics.get("report"),
            "collapse": metrics.get("collapse"),  # the collapse monitor's verdict: a collapsed backbone is no teacher
            "train_time_s": (metrics.get("report") or {}).get("train_seconds"),
            "wall_time_s": round(time.perf_counter() - t0, 1), "task": metrics.get("task"),
            "commit": _commit(), "torch_threads": _threads(), "machine": platform.machine(),
        }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cmd_run(a) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    r = Runner(a.arch, Path(a.store).expanduser().resolve(), quiet=not a.progress)
    for flag in a.datasets:
        for key in a.methods:
            for seed in a.seeds if METHODS[key].seeded else [0]:
                if r.done(key, flag, seed, a.entries):
                    print(f"{r.result(key, flag, seed).stem}: done before", flush=True)
                    continue
                r.ensure(key, flag, seed, need_entry=a.entries)


# ----------------------------------------------------------------------------------------- report


def _rows() -> dict[tuple[str, str, str], dict[int, dict]]:
    """(arch, dataset, method) -> seed -> run result."""
    out: dict[tuple[str, str, str], dict[int, dict]] = {}
    for p in sorted(RUNS.glob("*.json")):
        r = json.loads(p.read_text())
        out.setdefault((r.get("arch", "resnet18"), r["dataset"], r["method"]), {})[int(r["seed"])] = r
    return out


def _teacher_rows(runs: dict[int, dict]) -> dict[int, dict]:
    """The teacher's own figures from the distilled runs that trained its probe (one per student seed)."""
    out = {}
    for seed, r in runs.items():
        t = r.get("teacher")
        if isinstance(t, dict) and "test" in t:
            out[seed] = {"test": t["test"], "val": t["val"], "task": r["task"]}
    return out


def _teacher_acc(runs: dict[int, dict]) -> list[float]:
    """The test ACC of each run's teacher (CA-MKD's first), for the runs that had one."""
    return [(r["teacher"][0] if isinstance(r["teacher"], list) else r["teacher"])["test"]["acc"]
            for r in runs.values() if r.get("teacher")]


def _test_labels(flag: str) -> np.ndarray:
    from zoo.data import load_split

    return load_split(flag, "test").labels.numpy()


def _correct(r: dict, labels: np.ndarray) -> np.ndarray:
    """(N,) 1 where the run's test prediction is right (single-label tasks)."""
    pred = unpack_predictions(r["test_pred"], len(labels))
    return (pred == labels[:, 0]).astype(np.float64)


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(a: dict[int, dict], b: dict[int, dict], labels: np.ndarray | None, n_boot: int = 2000) -> dict | None:
    """``a - b`` paired by seed: mean and 95 % t interval of the per-seed ACC/AUC differences, and a
    bootstrap interval over test images of the seed-averaged ACC difference."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    out: dict = {"seeds": seeds}
    for k in ("acc", "auc"):
        d = np.array([a[s]["test"][k] - b[s]["test"][k] for s in seeds])
        half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else None
        out[k] = {"mean": float(d.mean()), "per_seed": d.tolist(),
                  "ci95": [float(d.mean() - half), float(d.mean() + half)] if half is not None else None}
    if labels is not None and not get_task(a[seeds[0]]["task"]).multilabel:
        ca = np.mean([_correct(a[s], labels) for s in seeds], axis=0)
        cb = np.mean([_correct(b[s], labels) for s in seeds], axis=0)
        rng = np.random.default_rng(0)
        n = len(labels)
        boots = np.array([(ca[i] - cb[i]).mean() for i in (rng.integers(0, n, n) for _ in range(n_boot))])
        out["acc"]["bootstrap95"] = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
    return out


def _ms(vals: list[float]) -> dict:
    v = np.array(vals)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": len(v)}


def _fmt(x: dict | None, key: str = "mean") -> str:
    if not x:
        return "—"
    s = f"{x['mean']:.3f}"
    return s + (f" ± {x['std']:.3f}" if x.get("std") is not None else "") + (f" (n={x['n']})" if x["n"] < 3 else "")


# Rows computed from other rows: the DINO-MX linear probe is trained inside each ``kd-dinomx`` run.
DERIVED = {"dinomx-linear": ("kd-dinomx", "teacher: DINO-MX + linear probe (frozen; the paper's teacher, offline)")}
TEACHERS = ("ensemble", "ensemble-aug", "finetune", "dinomx", "dinomx-linear")  # not students: no goal check


def _published(flag: str) -> dict:
    from zoo import anchors

    try:
        v2 = [r for r in anchors.read("medmnist_v2_benchmark.csv") if r["dataset"] == flag]
        best = max((r for r in v2 if r["metric"] == "acc"), key=lambda r: float(r["value"]), default=None)
        ref18 = anchors.medmnist_v2(flag, "ResNet-18 (28)")
        paper = {f"{r['method']} {r['metric']}": {"mean": float(r["mean"]), "std": float(r["std"])}
                 for r in anchors.read("medalmighty_table2.csv") if r["dataset"] == flag}
    except (FileNotFoundError, KeyError, ValueError):
        return {"medmnist_v2_best_acc": None, "medmnist_v2_resnet18_28": None, "medalmighty_paper": {}}
    return {"medmnist_v2_best_acc": {"method": best["method"], "acc": float(best["value"])} if best else None,
            "medmnist_v2_resnet18_28": ref18, "medalmighty_paper": paper}


def _ci(cmp: dict | None, k: str) -> str:
    if not cmp:
        return "—"
    c = cmp[k]
    s = f"{100 * c['mean']:+.2f} pt"
    if c.get("ci95"):
        s += f" [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]"
    if k == "acc" and c.get("bootstrap95"):
        s += f" (boot. [{100 * c['bootstrap95'][0]:+.2f}, {100 * c['bootstrap95'][1]:+.2f}])"
    return s


def _pf(x: dict | None) -> str:
    return "—" if not x else f"{x['mean']:.3f} ± {x['std']:.3f}"


def _dataset_table(arch: str, flag: str, rows: dict, lines: list[str]) -> dict:
    labels = _test_labels(flag)
    counts = np.bincount(labels[:, 0]) if labels.shape[1] == 1 else None
    chance = float(counts.max() / counts.sum()) if counts is not None else None
    pub = _published(flag)
    ds: dict = {"chance_acc": chance, "published": pub, "methods": {}}
    paper = pub["medalmighty_paper"]
    ref18, best = pub["medmnist_v2_resnet18_28"], pub["medmnist_v2_best_acc"]
    lines += [f"**{arch} on {flag}**", "",
              f"Chance (majority class) test ACC {chance:.3f}." if chance is not None else "",
              (f"Published: MedMNIST v2 ResNet-18 (28) ACC {ref18['acc']:.3f} / AUC {ref18['auc']:.3f}; best MedMNIST "
               f"v2 ACC {best['acc']:.3f} ({best['method']}). MedAlmighty paper (224 px, ResNet-50 student, DINOv2 "
               f"ViT-B/14 teacher): ResNet-50 ACC {_pf(paper.get('ResNet-50 acc'))}, MedAlmighty ACC "
               f"{_pf(paper.get('MedAlmighty acc'))}, CA-MKD ACC {_pf(paper.get('CA-MKD acc'))}.")
              if ref18 and best else "",
              "", "| method | seeds | epochs | test ACC | test AUC | val AUC | teacher test ACC | teacher check | "
              "Δ ACC vs plain (95 % CI) | Δ AUC vs plain (95 % CI) |", "|---|---|---|---|---|---|---|---|---|---|"]
    keyed = [(k, m.label, m.plain, rows.get((arch, flag, k))) for k, m in METHODS.items()]
    keyed += [(k, label, None, _teacher_rows(rows.get((arch, flag, src), {}))) for k, (src, label) in DERIVED.items()]
    for key, label, plain, runs in keyed:
        if not runs:
            continue
        acc = _ms([r["test"]["acc"] for r in runs.values()])
        auc = _ms([r["test"]["auc"] for r in runs.values()])
        vauc = _ms([r["val"]["auc"] for r in runs.values()])
        tacc = _teacher_acc(runs)
        gates = [g for r in runs.values() for g in (r["teacher_gate"] if isinstance(r.get("teacher_gate"), list)
                                                   else [r.get("teacher_gate")]) if g]
        gate = ("—" if not gates else "stronger" if all(g["stronger"] for g in gates)
                else f"weaker than {gates[0]['reference']} ({sum(not g['stronger'] for g in gates)}/{len(gates)})")
        verdicts = [r["collapse"]["collapsed"] for r in runs.values() if isinstance(r.get("collapse"), dict)]
        if verdicts:  # a DINO-MX backbone: whether its objective stayed alive (training/dinomx/monitor.py)
            gate = "collapsed" if any(verdicts) else "objective alive"
        cmp = paired(runs, rows.get((arch, flag, plain), {}), labels) if plain else None
        # The schedule each run trained for (cpu-fast's step bounds give a dataset its own epoch count).
        epochs = sorted({r["epochs"] for r in runs.values() if r.get("epochs")})
        ds["methods"][key] = {"label": label, "acc": acc, "auc": auc, "val_auc": vauc, "seeds": sorted(runs),
                              "epochs": epochs, "teacher_test_acc": _ms(tacc) if tacc else None,
                              "teacher_check": gate, "vs": plain, "paired": cmp}
        lines.append(f"| {label} (`{key}`) | {len(runs)} | {', '.join(map(str, epochs)) or '—'} | {_fmt(acc)} | "
                     f"{_fmt(auc)} | {_fmt(vauc)} | "
                     f"{_fmt(_ms(tacc)) if tacc else '—'} | {gate} | {_ci(cmp, 'acc')} | {_ci(cmp, 'auc')} |")
    lines.append("")
    return ds


def _goal(ds: dict) -> dict:
    """The issue's check on one dataset: the best distilled student (by mean test ACC over >= 3 seeds) against
    the plain one, and the best student against the best MedMNIST v2 ACC."""
    ms = ds["methods"]
    plain = ms.get("plain")
    distilled = {k: v for k, v in ms.items() if v["vs"] and k.startswith(("kd", "camkd")) and v["acc"]["n"] >= 3}
    students = {k: v for k, v in ms.items() if k not in TEACHERS}
    out: dict = {"plain": plain["acc"]["mean"] if plain else None, "plain_n": plain["acc"]["n"] if plain else None}
    if distilled and plain:
        k, v = max(distilled.items(), key=lambda kv: kv[1]["acc"]["mean"])
        p = v["paired"] or {}
        gain = p.get("acc", {}).get("mean")
        auc_gain = p.get("auc", {}).get("mean")
        twin = ms.get(v["vs"])  # the plain student of the same recipe (plain-aug for the augmented ones)
        out.update(against=v["vs"], against_acc=twin["acc"]["mean"] if twin else None)
        out.update(best_distilled=k, distilled_acc=v["acc"]["mean"], gain_pt=100 * gain if gain is not None else None,
                   auc_gain_pt=100 * auc_gain if auc_gain is not None else None,
                   met=gain is not None and gain >= 0.005 and auc_gain is not None and auc_gain >= 0)
    if students:
        k, v = max(students.items(), key=lambda kv: kv[1]["acc"]["mean"])
        best = ds["published"]["medmnist_v2_best_acc"]
        out.update(best_student=k, best_student_acc=v["acc"]["mean"], best_student_n=v["acc"]["n"],
                   v2_best=best["acc"] if best else None,
                   reaches_v2_best=bool(best) and v["acc"]["mean"] >= best["acc"])
    return out


def report(out: Path = RESULTS / "medalmighty_table2") -> dict:
    """Table 2 from the result files: one section per student architecture, one table per dataset (the local
    four first, then any other dataset that has runs), and the issue's goal check per dataset."""
    rows = _rows()
    archs = sorted({a for a, _, _ in rows}, key=lambda a: (a != "resnet18", a))
    result: dict = {"archs": {}}
    lines = ["Mean ± std over seeds of the test split; paired differences are by seed (same initialisation and "
             "batch order), with a 95 % t interval over seeds and a bootstrap interval over test images. "
             "Chance: always answering the test split's most frequent class. Teachers (ensembles, the fine-tuned "
             "and DINO-MX models) are rows of their own. Runs: `python -m benchmarks.medalmighty_table2 run "
             "--methods ... --datasets ... --seeds 0 1 2`; this table: `python -m benchmarks.medalmighty_table2 "
             "report`.", ""]
    body: list[str] = []
    goals: dict = {}
    for arch in archs:
        flags = sorted({f for a, f, _ in rows if a == arch}, key=lambda f: (f not in LOCAL, LOCAL.index(f)
                                                                             if f in LOCAL else 0, f))
        result["archs"][arch] = {}
        for flag in flags:
            ds = _dataset_table(arch, flag, rows, body)
            ds["goal"] = _goal(ds)
            result["archs"][arch][flag] = ds
            if arch == "resnet18":
                goals[flag] = ds["goal"]
    if goals:
        lines += ["**Goal check (ResNet-18).** Best distilled ResNet-18 (≥ 3 seeds) against the plain one of the same "
                  "recipe (paired by seed: `plain` for the paper's, `plain-aug` for the augmented ones): the goal "
                  "is ≥ +0.5 pt ACC with AUC no worse; and the best student against the best MedMNIST v2 ACC.", "",
                  "| dataset | plain ACC | best distilled | its ACC | paired against | its ACC | Δ ACC | Δ AUC | "
                  "≥ +0.5 pt, AUC no worse | best student | its ACC | MedMNIST v2 best ACC | reached |",
                  "|---" * 13 + "|"]

        def f3(x, n=None):  # a figure from fewer seeds than the goal asks for says how many
            return "—" if x is None else f"{x:.3f}" + (f" (n={n})" if n is not None and n < 3 else "")

        def pt(x):
            return "—" if x is None else f"{x:+.2f} pt"

        for flag, g in goals.items():
            lines.append(f"| {flag} | {f3(g.get('plain'), g.get('plain_n'))} | {g.get('best_distilled', '—')} | "
                         f"{f3(g.get('distilled_acc'))} | {g.get('against', '—')} | {f3(g.get('against_acc'))} | "
                         f"{pt(g.get('gain_pt'))} | {pt(g.get('auc_gain_pt'))} | "
                         f"{'yes' if g.get('met') else 'no' if 'met' in g else '—'} | {g.get('best_student', '—')} | "
                         f"{f3(g.get('best_student_acc'), g.get('best_student_n'))} | {f3(g.get('v2_best'))} | "
                         f"{'yes' if g.get('reaches_v2_best') else 'no' if 'reaches_v2_best' in g else '—'} |")
        lines.append("")
        result["goal"] = goals
    from zoo.store import write_atomic, write_json_atomic

    write_json_atomic(out.with_suffix(".json"), result)
    text = "\n".join(x for x in lines + body if x is not None) + "\n"
    write_atomic(out.with_suffix(".md"), lambda p: p.write_text(text))
    table4(rows, out.parent / "medalmighty_table4")
    return result


def table4(rows: dict, out: Path = RESULTS / "medalmighty_table4") -> dict:
    """MedAlmighty's Table 4 (the (t, a) grid) on our data: the ``kd-ens-t*-a*`` rows next to the paper's
    figures for the same dataset and pair (``../shared/anchors/medalmighty_table4_ablation.csv``)."""
    from training.config import load_config
    from zoo import anchors
    from zoo.store import write_atomic, write_json_atomic

    d = load_config(PAPER)["distill"]  # kd-ens is the grid's default cell: the recipe's own (t, a)
    grid = {k: m for k, m in METHODS.items() if k.startswith("kd-ens-t")}
    pairs = {k: tuple(float(next(o for o in m.overrides if o.startswith(f"distill.{p}=")).split("=")[1])
                      for p in ("temperature", "alpha")) for k, m in grid.items()}
    pairs["kd-ens"] = (float(d["temperature"]), float(d["alpha"]))
    try:
        paper = {(r["dataset"], float(r["temperature"]), float(r["alpha"]), r["metric"]): float(r["value"])
                 for r in anchors.read("medalmighty_table4_ablation.csv")}
    except (FileNotFoundError, KeyError, ValueError):
        paper = {}
    result: dict = {}
    lines = ["Distilled ResNet-18 at 28 px from the ensemble teacher for each (t, a) of MedAlmighty's Table 4, "
             "mean ± std over seeds of the test split, paired against the plain student; the paper's figures "
             "(224 px ResNet-50 student, DINOv2 teacher) beside them. Teacher test ACC: the ensemble each cell's runs "
             "were distilled from (members rebuilt in a later session need not equal the recorded ones). "
             "Runs: `python -m benchmarks.medalmighty_table2 "
             f"run --methods kd-ens {' '.join(grid)} --datasets FLAG`.", ""]
    for (arch, flag, key), runs in sorted(rows.items()):
        if key not in pairs or arch != "resnet18" or not any(k in pairs for a_, f_, k in rows if f_ == flag
                                                              and k != "kd-ens"):
            continue
        t, a = pairs[key]
        cmp = paired(runs, rows.get((arch, flag, "plain"), {}), None)
        tacc = _teacher_acc(runs)
        result.setdefault(flag, []).append({
            "temperature": t, "alpha": a, "teacher_test_acc": _ms(tacc) if tacc else None,
            "acc": _ms([r["test"]["acc"] for r in runs.values()]),
            "auc": _ms([r["test"]["auc"] for r in runs.values()]), "paired_vs_plain": cmp,
            "paper": {m: paper.get((flag, t, a, m)) for m in ("acc", "auc")}})
    grid_order = [tuple(map(float, g)) for g in d.get("grid", [])]  # ties go to the earlier, as in the search
    chosen = {}
    for flag in result:
        ran = [k for k, v in pairs.items() if v in {(c["temperature"], c["alpha"]) for c in result[flag]}]
        ran.sort(key=lambda k: (grid_order.index(pairs[k]) if pairs[k] in grid_order else len(grid_order), pairs[k]))
        chosen[flag] = val_chosen({k: rows.get(("resnet18", flag, k), {}) for k in ran},
                                  rows.get(("resnet18", flag, "plain"), {}), pairs)
    for flag, cells in result.items():
        lines += [f"**{flag}**", "", "| t | a | seeds | teacher test ACC | test ACC | test AUC | Δ ACC vs plain | "
                  "Δ AUC vs plain | paper ACC | paper AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(cells, key=lambda c: (c["temperature"], c["alpha"])):
            pacc, pauc = ("—" if v is None else f"{v:.3f}" for v in (c["paper"]["acc"], c["paper"]["auc"]))
            cmp = c["paired_vs_plain"]
            lines.append(f"| {c['temperature']:g} | {c['alpha']:g} | {c['acc']['n']} | {_fmt(c['teacher_test_acc'])} | "
                         f"{_fmt(c['acc'])} | "
                         f"{_fmt(c['auc'])} | {_ci(cmp, 'acc')} | {_ci(cmp, 'auc')} | {pacc} | {pauc} |")
        v = chosen[flag]
        if v:
            cmp = v["paired_vs_plain"]
            picks = ", ".join(f"seed {s}: ({t:g}, {a:g})" for s, (t, a) in sorted(v["chosen"].items()))
            lines.append(f"| chosen on validation | | {v['acc']['n']} | | {_fmt(v['acc'])} | {_fmt(v['auc'])} | "
                         f"{_ci(cmp, 'acc')} | {_ci(cmp, 'auc')} | | |")
            lines += ["", f"Chosen on validation: for each seed, the (t, a) whose run has the best validation AUC "
                      f"(what `distill.search=grid` keeps; the test split never chooses): {picks}."
                      + (f" For seed(s) {', '.join(map(str, v['seeds_with_different_teachers']))} the cells were "
                         "distilled from different teachers (an ensemble rebuilt in another session), which a "
                         "search within one build never is." if v["seeds_with_different_teachers"] else "")]
        lines.append("")
    if not result:
        lines.append("_No Table 4 runs yet._")
    result = {flag: {"cells": cells, "chosen_on_validation": chosen[flag]} for flag, cells in result.items()}
    write_json_atomic(out.with_suffix(".json"), result)
    text = "\n".join(lines) + "\n"
    write_atomic(out.with_suffix(".md"), lambda p: p.write_text(text))
    return result


def val_chosen(cells: dict[str, dict[int, dict]], plain: dict[int, dict],
               pairs: dict[str, tuple[float, float]]) -> dict | None:
    """Per seed, the grid cell with the best validation AUC (the first in grid order on a tie, as
    ``distill.search=grid`` keeps it), over the seeds every cell has run; its test figures and the
    paired difference against the plain student. None unless at least two cells share a seed."""
    seeds = sorted(set.intersection(*(set(r) for r in cells.values()))) if len(cells) >= 2 else []
    if not seeds:
        return None
    picked, which = {}, {}
    for s in seeds:
        best = None
        for key, runs in cells.items():
            if best is None or runs[s]["val"]["auc"] > cells[best][s]["val"]["auc"]:
                best = key
        picked[s], which[s] = cells[best][s], pairs[best]
    # distill.search=grid trains every cell from one teacher; cells run in other sessions may not share it
    mixed = [s for s in seeds if len({(runs[s].get("lineage") or {}).get("teacher_sha256")
                                      for runs in cells.values()}) > 1]
    return {"chosen": which, "seeds_with_different_teachers": mixed,
            "acc": _ms([r["test"]["acc"] for r in picked.values()]),
            "auc": _ms([r["test"]["auc"] for r in picked.values()]), "paired_vs_plain": paired(picked, plain, None)}


def cmd_report(a) -> None:
    report()
    print(f"wrote {RESULTS / 'medalmighty_table2.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells (resumable)")
    r.add_argument("--methods", nargs="+", default=["plain"], choices=list(METHODS))
    r.add_argument("--datasets", nargs="+", default=LOCAL)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--arch", default="resnet18")
    r.add_argument("--store", default=os.environ.get("BENCH_STORE", "~/.cache/medzoo-bench"),
                   help="where the runs' zoo entries are built (one store per method and seed)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.add_argument("--entries", action="store_true",
                   help="also rebuild into --store the entries of cells that ran in an earlier session (the members "
                        "of a teacher, e.g. the plain students, one process per seed); the recorded results stay")
    r.add_argument("--progress", action="store_true")
    r.set_defaults(fn=cmd_run)
    p = sub.add_parser("report", help="the tables from the result files (every architecture and dataset run)")
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
