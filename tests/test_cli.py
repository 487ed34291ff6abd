"""The `zoo` command: summaries, JSON output, and one-line errors with status 2.

Each subprocess pays ~5 s of imports (torch, torchmetrics, medmnist) here, so the process boundary is
crossed for the main flows and the error cases; further branches call ``zoo.cli.main`` in-process.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from conftest import flip_byte, install, run_cli
from medmnist.evaluator import getACC, getAUC

from zoo.cli import main
from zoo.data import datasets_2d


def _env():
    return {k: os.environ[k] for k in ("ZOO_HOME", "MEDMNIST_ROOT")}


def test_list_names_every_dataset_and_ends_with_summary():
    r = run_cli("list", env=_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    names, summary = lines[:-1], lines[-1]
    assert len(names) == 144
    for flag in datasets_2d():
        assert sum(n.endswith(f"-{flag}") for n in names) == 12
    assert summary == f"144 models, 0 built in {os.environ['ZOO_HOME']}"


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
    assert lines == [f"{name}  [built]", f"144 models, 1 built in {os.environ['ZOO_HOME']}"]
    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((built_resnet18_breast / "metrics.json").read_text())
    assert f"test         acc {metrics['test']['acc']:.4f}  auc {metrics['test']['auc']:.4f}" in out
    assert out.strip().splitlines()[-1].startswith(f"{name}: built, card at ")
    assert main(["eval", name, "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} on breastmnist/val (48 images): acc {metrics['val']['acc']:.4f}")


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
    assert all(len(row["probs"]) == 2 and row["label"] in ("malignant", "normal, benign") for row in rows)
    assert all(abs(sum(row["probs"]) - 1) < 1e-5 for row in rows)


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
