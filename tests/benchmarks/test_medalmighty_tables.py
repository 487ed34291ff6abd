"""The MedAlmighty Table 2/3/4 scripts: resumable runs in dependency order, paired statistics against
their formulas, the goal check, and FLOPs against a hand count."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch.nn as nn
from scipy import stats

import benchmarks.medalmighty_table2 as T2
import benchmarks.medalmighty_table3 as T3
from zoo.data import load_split


def _row(method: str, seed: int, correct: np.ndarray, labels: np.ndarray, auc: float, arch: str = "resnet18",
         teacher: dict | None = None) -> dict:
    pred = np.where(correct, labels[:, 0], 1 - labels[:, 0])
    probs = np.stack([1 - pred, pred], axis=1).astype(np.float32)
    return {"run": T2.run_id(method, arch, "breastmnist", seed), "method": method, "arch": arch,
            "dataset": "breastmnist", "seed": seed, "task": "binary-class",
            "val": {"acc": float(correct.mean()), "auc": auc}, "test": {"acc": float(correct.mean()), "auc": auc},
            "teacher": teacher, "teacher_gate": None, "test_pred": T2.pack_predictions(probs, "binary-class"),
            "epochs": 100}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    d.mkdir()
    monkeypatch.setattr(T2, "RUNS", d)
    return d


def _write(runs, row):
    (runs / f"{row['run']}.json").write_text(json.dumps(row))


def test_predictions_round_trip():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    assert T2.unpack_predictions(T2.pack_predictions(probs, "binary-class"), 3).tolist() == [0, 1, 0]
    probs = np.eye(5, dtype=np.float32)[[3, 1, 4]]
    assert T2.unpack_predictions(T2.pack_predictions(probs, "multi-class"), 3).tolist() == [3, 1, 4]


def test_paired_differences_and_intervals_follow_their_formulas(runs, tmp_path):
    labels = load_split("breastmnist", "test").labels.numpy()
    n = len(labels)
    rng = np.random.default_rng(0)
    plain, kd = {}, {}
    for s in range(3):
        base = rng.random(n) < 0.75
        plain[s] = _row("plain", s, base, labels, 0.80 + 0.01 * s)
        better = base | (rng.random(n) < 0.2)  # never worse on an image, better on some
        kd[s] = _row("kd-ens", s, better, labels, 0.82 + 0.01 * s, teacher={"test": {"acc": 0.9}, "val": {}})
    p = T2.paired(kd, plain, labels)
    d = np.array([kd[s]["test"]["acc"] - plain[s]["test"]["acc"] for s in range(3)])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert p["acc"]["mean"] == pytest.approx(d.mean()) and p["acc"]["per_seed"] == pytest.approx(d.tolist())
    assert p["acc"]["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-3)
    lo, hi = p["acc"]["bootstrap95"]
    assert 0 <= lo <= d.mean() <= hi  # never worse per image: the bootstrap cannot go below 0
    assert p["auc"]["mean"] == pytest.approx(0.02)

    backbone = _row("dinomx", 0, rng.random(n) < 0.7, labels, 0.7)
    backbone["collapse"] = {"collapsed": False, "verdict": "alive"}
    for r in [*plain.values(), *kd.values(), backbone]:
        _write(runs, r)
    res = T2.report(out=tmp_path / "table2")
    ds = res["archs"]["resnet18"]["breastmnist"]
    counts = np.bincount(labels[:, 0])
    assert ds["chance_acc"] == pytest.approx(counts.max() / counts.sum())
    g = res["goal"]["breastmnist"]
    assert g["best_distilled"] == "kd-ens" and g["gain_pt"] == pytest.approx(100 * d.mean())
    assert g["against"] == "plain"
    assert g["against_acc"] == pytest.approx(np.mean([r["test"]["acc"] for r in plain.values()]))
    assert g["met"] is bool(d.mean() >= 0.005)
    md = (tmp_path / "table2.md").read_text()
    assert "Chance (majority class) test ACC" in md and "`kd-ens`" in md
    assert ds["methods"]["kd-ens"]["epochs"] == [100] and "(`kd-ens`) | 3 | 100 |" in md  # the schedule trained
    assert ds["methods"]["dinomx"]["teacher_check"] == "objective alive"  # the collapse monitor's verdict
    assert (tmp_path / "medalmighty_table4.md").is_file()


def test_cells_run_once_and_after_what_they_need(runs, tmp_path, monkeypatch):
    order = []

    def fake_run(self, m, flag, seed, members):
        order.append((m.key, seed, [p.parent.name for p in members]))
        (self.entry_dir(m.key, flag, seed)).mkdir(parents=True, exist_ok=True)
        (self.entry_dir(m.key, flag, seed) / "config.json").write_text("{}")
        return {"run": self.result(m.key, flag, seed).stem, "method": m.key, "test": {"acc": 0.5, "auc": 0.5}}

    monkeypatch.setattr(T2.Runner, "_run", fake_run)
    r = T2.Runner("resnet18", tmp_path / "store", log=lambda m: None)
    r.ensure("kd-ens", "breastmnist", 1)
    assert order == [("plain", 0, []), ("plain", 1, []), ("plain", 2, []),
                     ("kd-ens", 1, ["seed0", "seed1", "seed2"])]
    r.ensure("kd-ens", "breastmnist", 1)  # its result file exists: nothing runs again
    r.ensure("kd-ens", "breastmnist", 2)  # the members are built: only the new cell runs
    assert order[4:] == [("kd-ens", 2, ["seed0", "seed1", "seed2"])]
    r.ensure("kd-ft", "breastmnist", 0)  # fine-tuned teacher: DINO-MX backbone, then fine-tuning, then the student
    assert [k for k, _, _ in order[5:]] == ["dinomx", "finetune", "kd-ft"]


def test_a_recorded_member_whose_store_is_gone_is_rebuilt_and_checked(runs, tmp_path, monkeypatch):
    acc = {0: 0.5, 1: 0.7}  # seed 1's rebuild scores otherwise than its recorded run

    def fake_run(self, m, flag, seed, members):
        (self.entry_dir(m.key, flag, seed)).mkdir(parents=True, exist_ok=True)
        (self.entry_dir(m.key, flag, seed) / "config.json").write_text("{}")
        return {"run": self.result(m.key, flag, seed).stem, "method": m.key, "test": {"acc": acc[seed], "auc": 0.5}}

    for seed in (0, 1):
        _write(runs, {"run": T2.run_id("plain", "resnet18", "breastmnist", seed), "test": {"acc": 0.5, "auc": 0.5}})
    monkeypatch.setattr(T2.Runner, "_run", fake_run)
    logs = []
    r = T2.Runner("resnet18", tmp_path / "store", log=logs.append)
    r.ensure("plain", "breastmnist", 0)  # a result is enough when no teacher needs the entry
    assert not r._built("plain", "breastmnist", 0) and logs == []
    for seed in (0, 1):
        r.ensure("plain", "breastmnist", seed, need_entry=True)
        assert r._built("plain", "breastmnist", seed)
    warned = [m for m in logs if m.startswith("WARNING")]
    assert len(warned) == 1 and "seed1" in warned[0] and "0.7000" in warned[0]
    recorded = json.loads((runs / f"{T2.run_id('plain', 'resnet18', 'breastmnist', 1)}.json").read_text())
    assert recorded["test"]["acc"] == 0.5  # the recorded result is never overwritten by a rebuild
    rebuilt = sorted(p.name for p in (runs / "rebuilt").iterdir())  # ... and the rebuild's own figures are kept
    assert rebuilt == [f"{T2.run_id('plain', 'resnet18', 'breastmnist', s)}.unknown.json" for s in (0, 1)]


def test_table4_chooses_each_seeds_cell_on_validation_never_on_test(runs, tmp_path):
    labels = load_split("breastmnist", "test").labels.numpy()
    n = len(labels)
    rng = np.random.default_rng(1)
    val_auc = {"kd-ens": [0.80, 0.90, 0.70], "kd-ens-t5-a0.5": [0.85, 0.90, 0.60], "kd-ens-t8-a0.8": [0.70, 0.50, 0.75]}
    test_acc = {}
    for s in range(3):
        _write(runs, _row("plain", s, rng.random(n) < 0.7, labels, 0.8))
        for key, aucs in val_auc.items():
            row = _row(key, s, rng.random(n) < 0.8, labels, 0.85)
            row["val"] = {"acc": 0.99, "auc": aucs[s]}  # test figures never enter the choice
            row["lineage"] = {"teacher_sha256": "b" if (key, s) == ("kd-ens", 2) else "a"}
            test_acc[key, s] = row["test"]["acc"]
            _write(runs, row)
    res = T2.table4(T2._rows(), out=tmp_path / "t4")["breastmnist"]
    v = res["chosen_on_validation"]
    # seed 0: t5 has the best val AUC; seed 1: a tie, the first in grid order (kd-ens, t 2) is kept; seed 2: t8
    assert v["chosen"] == {0: (5.0, 0.5), 1: (2.0, 0.2), 2: (8.0, 0.8)}
    picked = [test_acc["kd-ens-t5-a0.5", 0], test_acc["kd-ens", 1], test_acc["kd-ens-t8-a0.8", 2]]
    assert v["acc"]["mean"] == pytest.approx(np.mean(picked)) and v["paired_vs_plain"]["seeds"] == [0, 1, 2]
    assert len(res["cells"]) == 3
    assert v["seeds_with_different_teachers"] == [2]  # seed 2's kd-ens cell had another teacher: said so
    assert "| chosen on validation |" in (tmp_path / "t4.md").read_text()


def test_flops_are_counted_as_two_per_multiply_add():
    conv = nn.Conv2d(1, 2, 3, bias=False)  # 5x5 -> 2 x 3x3 outputs, 9 multiply-adds each
    assert T3.flops(conv, 1, 5) == 2 * (2 * 3 * 3) * 9
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    assert T3.flops(lin, 1, 2) == 2 * 4 * 3


def test_table3_row_counts_parameters_and_sizes(tmp_path):
    row = T3.measure(T3.CASES["resnet18-28"], "breastmnist", tmp_path, do_export=False, max_images=8, calib=8)
    net = T3.CASES["resnet18-28"].make(1, 1)
    assert row["params"] == sum(p.numel() for p in net.parameters())
    # FP32 weights: 4 bytes a parameter (+ buffers and the safetensors header)
    assert row["sizes_mb"]["safetensors"] * 2**20 >= 4 * row["params"]
    assert 0.5 < row["gflops"] < 2.0 and set(row["sizes_mb"]) == {"safetensors"}
