"""The `zoo` command: summaries, JSON output, and one-line errors with status 2.

Each subprocess pays ~5 s of imports (torch, torchmetrics, medmnist) here, so the process boundary is
crossed for the main flows and the error cases; further branches call ``zoo.cli.main`` in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, flip_byte, install, run_cli
from medmnist.evaluator import getACC, getAUC

from zoo.cli import main
from zoo.data import datasets_2d
from zoo.registry import list_models


def _env():
    return {k: os.environ[k] for k in ("ZOO_HOME", "MEDMNIST_ROOT")}


def test_list_names_every_dataset_and_ends_with_summary():
    r = run_cli("list", env=_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    names, summary = lines[:-1], lines[-1]
    assert names == list_models()  # the registry's base names (tests/zoo/test_registry.py checks which)
    for flag in datasets_2d():
        assert sum(n.endswith(f"-{flag}") for n in names) == len(list_models(flag)) > 0
    assert summary == f"{len(names)} models, 0 built in {os.environ['ZOO_HOME']}"


def test_info_unbuilt():
    r = run_cli("info", "medalmighty-resnet50-dermamnist", env=_env())
    assert r.returncode == 0, r.stderr
    assert "task         multi-class" in r.stdout and "in_chans     3" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == (
        "medalmighty-resnet50-dermamnist: not built; build it with `zoo build medalmighty-resnet50-dermamnist`")


def test_list_pattern_in_process(capsys):
    assert main(["list", "linear-*-bloodmnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"linear-dinov2-vit{s}14-bloodmnist" for s in "bls"]
    assert lines[3].startswith("3 models matching 'linear-*-bloodmnist', 0 built")
    assert main(["list", "no-such-thing"]) == 0
    assert capsys.readouterr().out.strip() == "no zoo model matches 'no-such-thing'"


def test_build_then_eval_json_matches_medmnist(tmp_path, medmnist_root):
    env = _env()
    name = "baseline-resnet18-breastmnist"
    r = run_cli("build", name, "train.epochs=1", "data.download=false", "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"built {name} in ")
    assert r.stderr == ""  # --quiet: no progress bars
    scores = tmp_path / "scores.npy"
    r = run_cli("eval", name, "--json", "--save-scores", str(scores), env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # stdout is one JSON object; the summary went to stderr
    res = json.loads(lines[0])
    assert (res["model"], res["dataset"], res["split"], res["n"]) == (name, "breastmnist", "test", 48)
    assert r.stderr.strip().startswith(f"evaluated {name} on test")
    probs = np.load(scores)
    labels = np.load(medmnist_root / "breastmnist.npz")["test_labels"]
    assert probs.shape == (48, 2)
    assert res["acc"] == getACC(labels, probs, "binary-class")
    assert abs(res["auc"] - getAUC(labels, probs, "binary-class")) <= 1e-12
    metrics = json.loads((tmp_path / "zoo_home" / name / "metrics.json").read_text())
    assert (res["acc"], res["auc"]) == (metrics["test"]["acc"], metrics["test"]["auc"])


def test_list_built_and_info_built_in_process(built_resnet18_breast, capsys):
    name = built_resnet18_breast.name
    install(built_resnet18_breast)
    assert main(["list", "--built"]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = json.loads((built_resnet18_breast / "metrics.json").read_text())
    assert lines[0].split() == ["name", "test", "ACC", "test", "AUC", "params", "MB", "input", "latency"]
    assert lines[1].split()[:3] == [name, f"{metrics['test']['acc']:.4f}", f"{metrics['test']['auc']:.4f}"]
    assert lines[1].split()[5] == "1x28x28"
    assert lines[2] == f"1 built of {len(list_models(variants=True))} models in {os.environ['ZOO_HOME']}"
    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert f"test         acc {metrics['test']['acc']:.4f}  auc {metrics['test']['auc']:.4f}" in out
    assert f"val          acc {metrics['val']['acc']:.4f}  auc {metrics['val']['auc']:.4f}" in out
    cfg = json.loads((built_resnet18_breast / "config.json").read_text())
    size = (built_resnet18_breast / "model.safetensors").stat().st_size
    sha = cfg["sha256"]["model.safetensors"][:16]
    assert f"file         model.safetensors  {size / 1e6:.2f} MB  sha256 {sha}..." in out
    assert f"({cfg['created']})" in out and "method       baseline" in out
    assert out.strip().splitlines()[-1].startswith(f"{name}: built, card at ")
    assert main(["eval", name, "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} on breastmnist/val (48 images): acc {metrics['val']['acc']:.4f}")


def _fake_copy(src, name, acc, dataset=None, latency_ms=None):
    """A copy of a built entry under another name, with its test ACC (and dataset) edited: for sorting."""
    d = install(src, name)
    m = json.loads((d / "metrics.json").read_text())
    m["test"]["acc"] = acc
    (d / "metrics.json").write_text(json.dumps(m))
    cfg = json.loads((d / "config.json").read_text())
    cfg["entry"]["name"] = name
    if dataset:
        cfg["entry"]["dataset"] = dataset
    (d / "config.json").write_text(json.dumps(cfg))
    if latency_ms is not None:
        b = d / "export" / "onnx-int8"
        b.mkdir(parents=True)
        (b / "model.onnx").write_bytes(b"\0" * 100)
        (b / "export.json").write_text(json.dumps({"format": "onnx-int8", "latency": {"ms": latency_ms}}))
    return d


def test_list_built_is_a_leaderboard_json_and_csv(built_resnet18_breast, tmp_path, capsys):
    import csv

    from safetensors import safe_open

    _fake_copy(built_resnet18_breast, "baseline-resnet50-breastmnist", 0.5)
    _fake_copy(built_resnet18_breast, "baseline-resnet18-breastmnist.224", 0.9, latency_ms=0.25)
    _fake_copy(built_resnet18_breast, "baseline-resnet18-bloodmnist", 0.1, dataset="bloodmnist")
    assert main(["list", "--built", "--json", "--csv", str(tmp_path / "board.csv")]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)  # one JSON document; the summary on stderr
    total = len(list_models(variants=True))
    assert err.strip() == f"3 built of {total} models in {os.environ['ZOO_HOME']}; wrote {tmp_path / 'board.csv'}"
    assert [r["name"] for r in rows] == ["baseline-resnet18-bloodmnist", "baseline-resnet18-breastmnist.224",
                                         "baseline-resnet50-breastmnist"]  # by dataset, then ACC (best first)
    with safe_open(built_resnet18_breast / "model.safetensors", "np") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    size = (built_resnet18_breast / "model.safetensors").stat().st_size
    r = rows[1]
    assert r == {"name": "baseline-resnet18-breastmnist.224", "dataset": "breastmnist", "eval": "test",
                 "test_acc": 0.9, "test_auc": r["test_auc"], "params": params, "mb": round(size / 1e6, 2),
                 "input": "1x28x28", "latency_ms": 0.25, "latency_format": "onnx-int8"}
    assert rows[0]["latency_ms"] is None and rows[0]["latency_format"] is None
    with open(tmp_path / "board.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == [r["name"] for r in rows]
    assert table[1]["params"] == str(params) and table[1]["latency_ms"] == "0.25" and table[0]["latency_ms"] == ""
    assert main(["list", "--built"]) == 0  # the table: the latency column reads the receipt
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("baseline-resnet18-breastmnist.224 ") and lines[2].endswith("0.25 ms (onnx-int8)")
    assert lines[1].endswith("3x28x28") or lines[1].endswith("1x28x28")  # no receipt: the latency column is empty


def test_list_and_info_json(capsys):
    assert main(["list", "breastmnist", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    n = len(list_models("breastmnist"))
    assert [r["name"] for r in rows] == list_models("breastmnist") and not any(r["built"] for r in rows)
    assert rows[0] == {"name": "baseline-resnet18-breastmnist", "built": False}
    assert err.startswith(f"{n} models matching 'breastmnist', 0 built")
    assert main(["info", "baseline-resnet18-breastmnist", "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["built"] is False and info["entry"]["in_chans"] == 1 and info["build"].startswith("zoo build ")
    assert info["variants"] == ["baseline-resnet18-breastmnist.224", "baseline-resnet18-breastmnist.plus224"]
    assert err.strip().endswith("not built; build it with `zoo build baseline-resnet18-breastmnist`")


def test_info_built_json_lists_files_with_sizes(built_resnet18_breast, capsys):
    d = install(built_resnet18_breast)
    assert main(["info", d.name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = json.loads((d / "config.json").read_text())
    assert info["built"] is True and info["dir"] == str(d) and info["created"] == cfg["created"]
    assert info["entry"] == cfg["entry"] and info["lineage"] == cfg["lineage"]
    assert info["metrics"] == json.loads((d / "metrics.json").read_text())
    files = {f["path"]: f for f in info["files"]}
    assert set(files) == {"model.safetensors", "config.json", "config.yaml", "metrics.json", "README.md",
                          "preprocessor_config.json"}
    assert files["model.safetensors"]["bytes"] == (d / "model.safetensors").stat().st_size
    assert files["model.safetensors"]["sha256"] == store_sha256(d / "model.safetensors")


def store_sha256(p):
    from zoo import store

    return store.sha256_file(p)


def test_predict_image_files(tmp_path, built_resnet18_breast, medmnist_root):
    from PIL import Image

    install(built_resnet18_breast)
    imgs = np.load(medmnist_root / "breastmnist.npz")["test_images"][:2]
    paths = []
    for i, a in enumerate(imgs):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(a).save(paths[-1])
    r = run_cli("predict", "baseline-resnet18-breastmnist", *paths, env=_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "predicted 2 image(s) with baseline-resnet18-breastmnist"
    rows = [json.loads(line) for line in lines[:2]]
    assert [row["image"] for row in rows] == paths
    for row in rows:  # the keys of the HTTP /classify answer, plus the image
        assert set(row) == {"image", "label", "labels", "probabilities", "threshold"}
        assert row["label"] in ("malignant", "normal, benign") and row["labels"] == [row["label"]]
        assert list(row["probabilities"]) == ["malignant", "normal, benign"] and row["threshold"] == 0.5
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["label"] == ("normal, benign" if row["probabilities"]["normal, benign"] > 0.5 else "malignant")


def test_predict_schema_is_the_servers():
    from serving.schemas import ClassifyResponse
    from zoo.cli import prediction_rows

    row = prediction_rows(np.array([[0.3, 0.7]]), ["a", "b"], "binary-class", ["x.png"])[0]
    assert set(row) - {"image"} <= set(ClassifyResponse.model_fields)
    assert row == {"image": "x.png", "label": "b", "labels": ["b"], "probabilities": {"a": 0.3, "b": 0.7},
                   "threshold": 0.5}
    ml = prediction_rows(np.array([[0.6, 0.2, 0.9]]), ["a", "b", "c"], "multi-label, binary-class", ["y"],
                         threshold=0.5, top_k=2)[0]
    assert (ml["label"], ml["labels"]) == ("c", ["a", "c"])
    assert ml["top_k"] == [{"label": "c", "probability": 0.9}, {"label": "a", "probability": 0.6}]
    mc = prediction_rows(np.array([[0.2, 0.5, 0.3]]), ["a", "b", "c"], "multi-class", ["z"])[0]
    assert (mc["label"], mc["labels"], mc["threshold"]) == ("b", ["b"], None)


def _image_folder(folder, medmnist_root, n=5):
    from PIL import Image

    folder.mkdir()
    imgs = np.load(medmnist_root / "breastmnist.npz")["test_images"][:n]
    names = []
    for i, a in enumerate(imgs):
        if i == 1:
            np.save(folder / f"im{i}.npy", a)
            names.append(f"im{i}.npy")
        else:
            Image.fromarray(a).save(folder / f"im{i}.{'jpg' if i == 2 else 'png'}")
            names.append(f"im{i}.{'jpg' if i == 2 else 'png'}")
    (folder / "notes.txt").write_text("not an image")
    return imgs, names


def test_predict_folder_manifest_out_csv_jsonl(built_resnet18_breast, medmnist_root, tmp_path, capsys):
    import csv

    import zoo

    install(built_resnet18_breast)
    name = "baseline-resnet18-breastmnist"
    imgs, names = _image_folder(tmp_path / "imgs", medmnist_root)
    folder = str(tmp_path / "imgs")
    assert main(["predict", name, folder, "--out", str(tmp_path / "p.csv"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"predicted 5 image(s) with {name}; wrote {tmp_path / 'p.csv'}"  # no rows on stdout
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.reader(f))
    labels = ["malignant", "normal, benign"]
    assert table[0] == ["image", "label", *labels]
    assert [t[0] for t in table[1:]] == [os.path.join(folder, n) for n in sorted(names)]
    from zoo.images import read_image

    pred = zoo.load(name).predict([read_image(tmp_path / "imgs" / n) for n in sorted(names)])
    for t, lab, p in zip(table[1:], pred.labels, pred.probs):
        assert t[1] == lab and [float(x) for x in t[2:]] == [round(float(v), 6) for v in p]

    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,split\n../imgs/im3.png,test\n../imgs/im1.npy,test\n")
    assert main(["predict", name, str(manifest), "--out", str(tmp_path / "p.jsonl"), "--top-k", "1",
                 "--threshold", "0.9"]) == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["../imgs/im3.png", "../imgs/im1.npy"]  # as the manifest names them
    for r in rows:
        p = r["probabilities"]["normal, benign"]
        assert r["threshold"] == 0.9 and r["label"] == ("normal, benign" if p > 0.9 else "malignant")
        assert r["top_k"] == [max(({"label": k, "probability": v} for k, v in r["probabilities"].items()),
                                  key=lambda x: x["probability"])]
    assert main(["predict", name, str(tmp_path / "imgs" / "im0.png"), "--json"]) == 0
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert row["image"] == str(tmp_path / "imgs" / "im0.png") and err.startswith("predicted 1 image(s)")


PREDICT_USAGE = {
    "threshold on softmax": (["--threshold", "0.3"], "dermamnist", "--threshold applies to sigmoid tasks"),
    "threshold range": (["--threshold", "1.5"], None, r"in \[0, 1\].*got 1.5"),
    "top-k range": (["--top-k", "3"], None, "--top-k must be 1..2"),
    "batch size": (["--batch-size", "0"], None, "--batch-size must be at least 1"),
    "empty folder": (["EMPTY"], None, "no PNG, JPEG or .npy file in this folder"),
    "manifest without path": (["MANIFEST"], None, "a manifest needs a 'path' column"),
}


@pytest.mark.parametrize("case", list(PREDICT_USAGE))
def test_predict_usage_errors(case, built_resnet18_breast, tiny_runs, tmp_path, medmnist_root, capsys):
    args, flag, pattern = PREDICT_USAGE[case]
    install(built_resnet18_breast)
    model = str(tiny_runs["multi-class"]) if flag == "dermamnist" else "baseline-resnet18-breastmnist"
    _image_folder(tmp_path / "imgs", medmnist_root, n=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.csv").write_text("file\nimgs/im0.png\n")
    subst = {"EMPTY": str(tmp_path / "empty"), "MANIFEST": str(tmp_path / "m.csv")}
    args = [subst.get(x, x) for x in args]
    images = [] if any(x in subst.values() for x in args) else [str(tmp_path / "imgs" / "im0.png")]
    assert main(["predict", model, *images, *args]) == 2
    _check_error(capsys.readouterr().err, pattern)


def test_predict_cuda_device_without_cuda_is_a_usage_error(built_resnet18_breast, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    install(built_resnet18_breast)
    assert main(["predict", "baseline-resnet18-breastmnist", "x.png", "--device", "cuda"]) == 2
    _check_error(capsys.readouterr().err, "no CUDA device is available here; use --device cpu")
    with pytest.raises(SystemExit) as ei:
        main(["predict", "baseline-resnet18-breastmnist", "x.png", "--device", "tpu"])
    assert ei.value.code == 2


@pytest.mark.gpu
def test_predict_on_cuda_matches_cpu(built_resnet18_breast, tmp_path, medmnist_root, capsys):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    install(built_resnet18_breast)
    _image_folder(tmp_path / "imgs", medmnist_root)
    got = {}
    for device in ("cpu", "cuda"):
        assert main(["predict", "baseline-resnet18-breastmnist", str(tmp_path / "imgs"), "--json", "--device",
                     device]) == 0
        got[device] = json.loads(capsys.readouterr().out)
    for a, b in zip(got["cpu"], got["cuda"]):
        assert a["label"] == b["label"]
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-4 for k in a["probabilities"])


def test_push_dry_run_from_the_command_line(built_resnet18_breast, tmp_path, capsys):
    from huggingface_hub import metadata_load

    install(built_resnet18_breast)
    out = tmp_path / "dry"
    assert main(["push", "baseline-resnet18-breastmnist", "org/breast", "--dry-run", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == ["README.md", "config.json", "config.yaml", "metrics.json", "model.safetensors",
                          "preprocessor_config.json"]
    assert lines[-1] == f"dry run: 6 files for org/breast@main written to {out}; nothing uploaded"
    assert metadata_load(out / "README.md")["license"] == "cc-by-4.0"
    assert main(["push", "baseline-resnet18-breastmnist", "not a repo", "--dry-run", str(tmp_path / "x")]) == 2
    _check_error(capsys.readouterr().err, "is not a Hugging Face Hub repo id")


def test_version(capsys):
    import zoo

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"medzoo {zoo.__version__}"


def test_build_require_stronger_teacher_adds_the_override(monkeypatch, tmp_path, capsys):
    import zoo.api

    seen = {}
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"acc": 0.5, "auc": 0.5}, "val": {"auc": 0.5}}))

    def fake_build(name, overrides, progress, config_files):
        seen.update(name=name, overrides=list(overrides))
        return tmp_path

    monkeypatch.setattr(zoo.api, "build", fake_build)
    assert main(["build", "medalmighty-resnet18-breastmnist", "--require-stronger-teacher", "train.epochs=1"]) == 0
    assert seen["overrides"] == ["train.epochs=1", "distill.require_stronger_teacher=true"]
    assert main(["build", "medalmighty-resnet18-breastmnist"]) == 0
    assert seen["overrides"] == []


def test_bento_plugin_is_registered_when_its_module_exists():
    import importlib.util

    from zoo.cli import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"list", "info", "predict", "push", "serve"} <= set(sub.choices)
    assert ("bento" in sub.choices) == (importlib.util.find_spec("serving.bento") is not None)


def test_listing_and_help_do_not_import_torch(tmp_path):
    code = ("import sys, zoo.cli, zoo.registry; zoo.registry.list_models(); zoo.cli.parser();"
            "zoo.cli.main(['list', 'breastmnist']); zoo.cli.main(['list', '--built']);"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'medmnist', 'sklearn', 'huggingface_hub') "
            "if m in sys.modules); print(heavy)")
    env = {**os.environ, "ZOO_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


# --- errors: one line `zoo: error: ...` on stderr; exit status 2 for usage errors, 1 for runtime ones --

ERRORS = {
    "unknown model": (["eval", "baseline-resnet18-breastmnst"], "Closest: baseline-resnet18-breastmnist", 2),
    "unbuilt entry": (["eval", "baseline-resnet50-octmnist"], "`zoo build baseline-resnet50-octmnist`", 1),
    "unknown config key": (["build", "baseline-resnet18-breastmnist", "train.epohcs=1"],
                           "'train.epohcs'.*did you mean train.epochs", 2),
    "missing dataset file": (["build", "baseline-resnet18-breastmnist", "data.download=false", "--quiet"],
                             "MedMNIST file not found: .*nodata/breastmnist.npz.*MEDMNIST_ROOT", 1),
    "corrupted weights": (["eval", "baseline-resnet18-breastmnist"], "sha256 mismatch", 1),
}
IN_PROCESS_ERRORS = {
    "malformed override": (["build", "baseline-resnet18-breastmnist", "train.epochs"], "not of the form key=value",
                           2),
    "missing image file": (["predict", "baseline-resnet18-breastmnist", "nope.png"], "cannot read nope.png", 1),
    "bad train config": (["train", "nope.yaml"], "config file not found: nope.yaml", 2),
    "wrong pinned arch": (["build", "baseline-resnet18-breastmnist", "model.arch=resnet50"],
                          "is a resnet18 entry; an override set arch to resnet50", 2),
}


def _check_error(stderr: str, pattern: str) -> None:
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr  # exactly one line, no traceback
    assert stderr.startswith("zoo: error: ")
    assert re.search(pattern, stderr), stderr


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_subprocess(case, built_resnet18_breast, tmp_path):
    args, pattern, status = ERRORS[case]
    env = _env()
    if case == "corrupted weights":
        flip_byte(install(built_resnet18_breast) / "model.safetensors")
    if case == "missing dataset file":
        env["MEDMNIST_ROOT"] = str(tmp_path / "nodata")
    r = run_cli(*args, env=env)
    assert r.returncode == status, r.stderr
    _check_error(r.stderr, pattern)
    assert not any(p.name.startswith(".") for p in (tmp_path / "zoo_home").glob("*"))  # nothing half-built


@pytest.mark.parametrize("case", list(IN_PROCESS_ERRORS))
def test_errors_in_process(case, built_resnet18_breast, capsys):
    install(built_resnet18_breast)
    args, pattern, status = IN_PROCESS_ERRORS[case]
    assert main(args) == status
    _check_error(capsys.readouterr().err, pattern)


def test_usage_errors_are_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_train_command_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    # demo.yaml holds only the schedule now (the method is an entry's business): name it here
    rc = main(["train", "medalmighty/demo.yaml", "method=baseline", "model.arch=resnet-test", "train.epochs=1",
               "train.amp=none",
               "train.channels_last=false", f"output_dir={out}", "data.download=false", "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    (run,) = out.iterdir()
    assert run.name.startswith("baseline-resnet-test-breastmnist-")
    assert f"run:  {run}" in stdout and stdout.strip().splitlines()[-1].startswith(f"trained {run.name} in ")


def test_key_value_overrides_anywhere_on_the_line(capsys):
    from zoo.cli import parse_args

    a = parse_args(["build", "baseline-resnet18-breastmnist", "seed=1", "--config", "medalmighty/cpu-fast.yaml",
                    "train.epochs=1", "--quiet", "data.download=false"])
    assert a.overrides == ["seed=1", "train.epochs=1", "data.download=false"]
    assert a.config == ["medalmighty/cpu-fast.yaml"]
    with pytest.raises(SystemExit) as ei:  # a stray word is still an error
        parse_args(["build", "baseline-resnet18-breastmnist", "--config", "medalmighty/cpu-fast.yaml", "oops"])
    assert ei.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # commands without overrides take none
        parse_args(["eval", "baseline-resnet18-breastmnist", "train.epochs=1"])


def test_predict_refuses_16_bit_and_truncated_images_as_the_server_does(built_resnet18_breast, tmp_path, capsys):
    import io
    import struct

    from PIL import Image

    from zoo.images import ImageError, read_image

    def encoded(a: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        return buf.getvalue()

    install(built_resnet18_breast)
    j = encoded(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "JPEG")
    i = j.index(b"\xff\xc0")  # an 8 x 8 JPEG whose frame header claims 4000 x 4000
    cases = {"deep.png": encoded(np.full((28, 28), 4000, np.uint16), "PNG"),
             "lying.jpg": j[:i + 5] + struct.pack(">HH", 4000, 4000) + j[i + 9:]}
    for fname, body in cases.items():
        (tmp_path / fname).write_bytes(body)
        with pytest.raises(ImageError) as ei:
            read_image(body)
        assert main(["predict", "baseline-resnet18-breastmnist", str(tmp_path / fname)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"zoo: error: cannot read {tmp_path / fname} as an image: ") and ei.value.message in err
