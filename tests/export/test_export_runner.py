"""The edge runner: copied alone with its bundle into an empty folder, it classifies PNGs with only
numpy, Pillow and onnxruntime importable (``python -I -S``), as ``zoo.load(...).predict`` does."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TASK_FLAG
from edge_env import FORBIDDEN, edge_site
from PIL import Image

import export
from export import runner
from zoo.api import load
from zoo.data import load_split

WRAPPER = f"""
import json, runpy, sys
site, *args = sys.argv[1:]
sys.path.insert(0, site)
sys.argv = ["runner.py", *args]
code = 0
try:
    runpy.run_path("runner.py", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})), file=sys.stderr)
sys.exit(code)
"""


def run_runner(bundle: Path, work: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Copy the bundle's three files alone into ``work`` and run the runner there in ``python -I -S``."""
    work.mkdir(parents=True, exist_ok=True)
    for f in ("runner.py", "model.onnx", "preprocess.json"):
        shutil.copy(bundle / f, work / f)
    (work / "wrapper.py").write_text(WRAPPER)
    r = subprocess.run([sys.executable, "-I", "-S", "wrapper.py", str(edge_site(work.parent)), *args], cwd=work,
                       capture_output=True, text=True, timeout=120)
    imported = json.loads(r.stderr.strip().splitlines()[-1])
    return r, imported


def _png(path: Path, arr: np.ndarray) -> str:
    Image.fromarray(arr.squeeze()).save(path)
    return str(path)


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_runner_alone_matches_predict(tiny_runs, task, tmp_path):
    d, flag = tiny_runs[task], TASK_FLAG[task]
    bundle = export.to_onnx(d, "onnx", out=tmp_path / "bundle").dir
    imgs = load_split(flag, "test").images[:4].permute(0, 2, 3, 1).numpy()  # (N, 28, 28, C) uint8
    files = [_png(tmp_path / f"img{i}.png", im) for i, im in enumerate(imgs)]
    big = np.asarray(Image.fromarray(imgs[0].squeeze()).resize((64, 64), Image.NEAREST))
    files.append(_png(tmp_path / "big.png", big))  # another size: the runner resizes it

    r, imported = run_runner(bundle, tmp_path / "edge", *files)
    assert r.returncode == 0, r.stderr
    assert imported == []  # neither torch nor any project package was imported
    lines = [json.loads(ln) for ln in r.stdout.strip().splitlines()]

    model = load(d)
    pred = model.predict([Image.open(f) for f in files])
    assert [ln["image"] for ln in lines] == files
    assert [ln["label"] for ln in lines] == pred.labels
    got = np.array([list(ln["probabilities"].values()) for ln in lines])
    assert np.abs(got[:4] - pred.probs[:4]).max() <= 2e-6  # same input bit for bit at 28 px; rounding to 1e-6
    assert np.abs(got[4] - pred.probs[4]).max() <= 1e-4  # resized: one float32 rounding step per pixel
    if task == "multi-label, binary-class":
        assert [ln["labels"] for ln in lines] == pred.label_sets
    # one row schema: zoo predict's (and /classify's) keys, label order and values
    from zoo.cli import prediction_rows

    want = prediction_rows(pred.probs, list(model.entry.labels), model.entry.task, files)
    assert [set(ln) for ln in lines] == [set(w) for w in want]
    for ln, w in zip(lines, want):
        assert (ln["labels"], ln["threshold"], list(ln["probabilities"])) == (
            w["labels"], w["threshold"], list(w["probabilities"]))


def test_runner_saves_maps_and_reports_errors(tiny_runs, tmp_path):
    bundle = export.to_onnx(tiny_runs["multi-class"], "onnx", out=tmp_path / "bundle", with_localization=True).dir
    img = load_split("dermamnist", "test").images[0].permute(1, 2, 0).numpy()
    f = _png(tmp_path / "scan.png", img)
    r, imported = run_runner(bundle, tmp_path / "edge", f, "--maps", str(tmp_path / "maps"))
    assert r.returncode == 0 and imported == [], r.stderr
    cam = np.load(tmp_path / "maps" / "scan.npy")
    assert cam.shape == (7, 28, 28)
    assert "cam" not in json.loads(r.stdout)

    r, _ = run_runner(bundle, tmp_path / "edge2", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and r.stderr.startswith("runner: error: ")

    # images the zoo refuses stop the runner too, with the zoo's message, in one line
    for name, data in _refused_images().items():
        if name not in ("16-bit grey png", "16-bit rgb png", "jpeg claiming 4000 x 4000"):
            continue
        path = tmp_path / f"{name.replace(' ', '_')}.img"
        path.write_bytes(data)
        r, _ = run_runner(bundle, tmp_path / "edge3", str(path))
        assert r.returncode == 2 and r.stdout == "", name
        assert r.stderr.splitlines()[0] == f"runner: error: {path}: {_zoo_refusal(data).message}", name


@functools.cache
def _refused_images() -> dict[str, bytes]:
    """Images the one rule refuses: 16-bit (grey, and RGB, which Pillow opens as 8-bit), truncated or lying
    JPEG data, damaged PNG and .npy, too many pixels."""
    import io
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def save(a, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (8, 8, 3)).astype(">u2")
    rows = b"".join(b"\x00" + rgb16[i].tobytes() for i in range(8))
    png16_rgb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    j = save(rng.integers(0, 256, (8, 8), dtype=np.uint8), "JPEG")
    i = j.index(b"\xff\xc0")
    buf = io.BytesIO()
    np.save(buf, grey)
    return {"16-bit grey png": save(grey.astype(np.uint16) * 257, "PNG"), "16-bit rgb png": png16_rgb,
            "jpeg claiming 4000 x 4000": j[:i + 5] + struct.pack(">HH", 4000, 4000) + j[i + 9:],
            "cut jpeg": save(np.kron(grey, np.ones((4, 4), np.uint8)), "JPEG")[:-300],
            "cut png": save(grey, "PNG")[:60], "gif": b"GIF89a" + bytes(64),
            "npy without its closing brace": buf.getvalue().replace(b"}", b" ", 1),
            "too many pixels": save(np.zeros((5000, 4000), np.uint8), "PNG")}


def _zoo_refusal(data: bytes):
    from zoo.images import ImageError, read_image

    with pytest.raises(ImageError) as e:
        read_image(data)
    return e.value


@pytest.mark.parametrize("name", list(_refused_images()))
def test_runner_refuses_what_the_zoo_refuses_with_the_same_message(name):
    """The runner repeats zoo/images.py's rule in its own code (it must stay one file): same status, same words."""
    data = _refused_images()[name]
    want = _zoo_refusal(data)
    with pytest.raises(runner.ImageError) as got:
        runner.read_image(data)
    assert (got.value.status, got.value.message) == (want.status, want.message)


@pytest.mark.parametrize(("size", "out"), [((64, 64), 28), ((28, 28), 64), ((50, 37), 28), ((28, 28), 28)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_runner_resize_matches_torch(size, out, mode):
    x = np.random.default_rng(0).integers(0, 256, (3, *size)).astype(np.float32) / np.float32(255)
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    want = F.interpolate(torch.from_numpy(x)[None], size=(out, out), mode=mode, **kw)[0].numpy() if size != (
        out, out) else x
    got = runner.resize(x, out, mode)
    assert got.shape == (3, out, out) and np.abs(got - want).max() <= 2.5e-7
    if mode == "nearest" or size == (out, out):
        assert np.array_equal(got, want)


@pytest.mark.slow
def test_runner_in_a_real_venv_with_only_numpy_pillow_onnxruntime(tiny_runs, tmp_path):
    """The literal edge check: a fresh venv (no system site-packages) with just the three packages."""
    import onnxruntime

    venv = tmp_path / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pins = ["numpy", "pillow", f"onnxruntime=={onnxruntime.__version__}"]
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.skip(f"cannot install {pins} from the package index here: {pip.stderr.strip().splitlines()[-1:]}")
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    names = {ln.split("==")[0].lower() for ln in listed.split()}
    assert not names & {"torch", "timm", "transformers", "medzoo"}, names

    bundle = export.to_onnx(tiny_runs["binary-class"], "onnx", out=tmp_path / "bundle").dir
    work = tmp_path / "device"
    work.mkdir()
    for f in ("runner.py", "model.onnx", "preprocess.json"):
        shutil.copy(bundle / f, work / f)
    img = load_split("breastmnist", "test").images[0, 0].numpy()
    png = _png(work / "scan.png", img)
    r = subprocess.run([str(py), "runner.py", png], cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)
    pred = load(tiny_runs["binary-class"]).predict(Image.open(png))
    assert line["label"] == pred.labels[0]
    assert np.abs(np.array(list(line["probabilities"].values())) - pred.probs[0]).max() <= 2e-6


# ------------------------------------------------------------------------------------ uint8-input bundles


def test_runner_feeds_uint8_bundles_their_pixels(tiny_runs, tmp_path):
    """A uint8-input bundle: the runner sends each image's own pixels at its own size; the graph resizes,
    replicates grey and normalises; the answers are ``predict``'s."""
    d = tiny_runs["multi-class"]  # dermamnist: RGB, 7 classes
    bundle = export.to_onnx(d, "onnx", out=tmp_path / "bundle", uint8_input=True).dir
    spec = json.loads((bundle / "preprocess.json").read_text())
    assert spec["input_dtype"] == "uint8" and spec["preprocessing"] == "in-graph" and spec["input_layout"] == "NHWC"
    imgs = load_split("dermamnist", "test").images[:3].permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(1)
    files = [_png(tmp_path / f"img{i}.png", im) for i, im in enumerate(imgs)]
    files.append(_png(tmp_path / "big.png", np.asarray(Image.fromarray(imgs[0]).resize((90, 61), Image.NEAREST))))
    files.append(_png(tmp_path / "grey.png", rng.integers(0, 256, (40, 33), dtype=np.uint8)))  # grey for RGB
    r, imported = run_runner(bundle, tmp_path / "edge", *files)
    assert r.returncode == 0 and imported == [], r.stderr
    lines = [json.loads(ln) for ln in r.stdout.strip().splitlines()]
    pred = load(d).predict([Image.open(f) for f in files])
    assert [ln["label"] for ln in lines] == pred.labels
    got = np.array([list(ln["probabilities"].values()) for ln in lines])
    assert np.abs(got[:3] - pred.probs[:3]).max() <= 2e-6  # 28 px: the resize in the graph is the identity
    assert np.abs(got[3:] - pred.probs[3:]).max() <= 1e-4  # resized by ONNX Runtime's antialiased Resize

    np.save(tmp_path / "float.npy", imgs[0].astype(np.float32) / 255)
    r, _ = run_runner(bundle, tmp_path / "edge2", str(tmp_path / "float.npy"))
    assert r.returncode == 2 and "takes 8-bit images (exported with --uint8-input)" in r.stderr


# ------------------------------------------------------------------------------------ the torch-free twins
# export.edge (this runner) is the ONNX serving path's preprocessing, task rules and map post-processing;
# each must equal the zoo's torch-side original.


def _spec(in_chans: int, size: int, mode: str) -> dict:
    mean, std = [0.5, 0.4, 0.3][:in_chans], [0.2, 0.25, 0.3][:in_chans]
    return {"in_chans": in_chans, "input_size": size, "mean": mean, "std": std, "resize": mode, "scale": 255.0,
            "image_mode": "L" if in_chans == 1 else "RGB", "input_dtype": "float32"}


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_numpy_input_equals_zoo_preprocess(in_chans, mode):
    from zoo.data import Preprocess, preprocess
    from zoo.inference import to_batch

    spec = _spec(in_chans, 28, mode)
    prep = Preprocess(28, in_chans, tuple(spec["mean"]), tuple(spec["std"]), mode)
    rng = np.random.default_rng(0)
    grey, rgb = rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    forms = [grey, grey[:, :, None], Image.fromarray(grey), Image.fromarray(rgb),
             rng.random((28, 28)).astype(np.float32), rng.integers(0, 256, (64, 64), dtype=np.uint8),
             Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)), rng.random((20, 31, 1))]
    forms += [rgb, rng.random((45, 45, 3)).astype(np.float32)] if in_chans == 3 else []
    for i, image in enumerate(forms):
        (t,) = to_batch([image], in_chans)
        want = preprocess(t, prep)[0].numpy()
        got = runner.input_array(image, spec)
        assert got.shape == want.shape == (in_chans, 28, 28), i
        same_size = np.asarray(image).shape[:2] == (28, 28)
        assert np.abs(got - want).max() <= (0 if same_size else 2e-6), i  # resized: float32 rounding steps
    if in_chans == 1:  # colour is never averaged away silently, in either
        with pytest.raises(ValueError, match="this model takes 1-channel images"):
            runner.input_array(rng.random((28, 28, 3)).astype(np.float32), spec)


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_numpy_task_rules_equal_zoo(task):
    from zoo.inference import logits_to_probs, make_prediction
    from zoo.tasks import get_task

    k = {"binary-class": 1, "multi-class": 7, "ordinal-regression": 5, "multi-label, binary-class": 14}[task]
    logits = np.random.default_rng(0).normal(0, 3, (200, k)).astype(np.float32)
    logits[:3] = 0  # ties and the threshold itself
    want = logits_to_probs(torch.from_numpy(logits), task).numpy()
    got = runner.probabilities(logits, task)
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-6
    names = [f"c{i}" for i in range(want.shape[1] if task != "binary-class" else 2)]
    pred = make_prediction(torch.from_numpy(want), task, names)
    assert (runner.decide(want, task) == pred.indices).all()
    if task == "multi-label, binary-class":
        assert [[names[j] for j in np.flatnonzero(r)] for r in runner.positives(want, task)] == pred.label_sets
    assert runner.threshold(task) == get_task(task).threshold


def test_numpy_map_postprocessing_equals_zoo_maps():
    from zoo import maps

    rng = np.random.default_rng(0)
    for kind, task, shape in [("cam", "binary-class", (1, 28, 28)), ("cam", "multi-class", (7, 28, 28)),
                              ("attention", "binary-class", (32, 32))]:
        m = rng.normal(size=shape).astype(np.float32)
        for idx in range(2):
            want = maps.class_map(m, kind, task, idx)
            assert np.array_equal(runner.class_map(m, kind, task, idx), want)
            assert np.array_equal(runner.to_input_size(want, 224 if kind == "attention" else 28),
                                  maps.to_input_size(want, 224 if kind == "attention" else 28))
    for trial in range(300):  # blobs of several sizes: regions that touch, nest, and wrap around each other
        h, w = rng.integers(2, 40, size=2)
        heat = rng.random((h, w)) ** (1 + trial % 4)
        if trial % 3 == 0:
            heat = np.kron(heat[: h // 2 + 1, : w // 2 + 1], np.ones((2, 2)))[:h, :w]
        heat = maps.normalise(heat)
        assert np.array_equal(runner.normalise(heat), heat)
        for t in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert vars(runner.top_box(heat, t)) == vars(maps.top_box(heat, t)), (trial, t)
    assert np.array_equal(runner.normalise(np.full((4, 4), 3.0)), maps.normalise(np.full((4, 4), 3.0)))
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    heat = rng.random((28, 28))
    for kw in ({}, {"size": (224, 224), "box": runner.Box(3, 4, 20, 17)}, {"size": (300, 200)}):
        zkw = {**kw, "box": maps.Box(**vars(kw["box"]))} if "box" in kw else kw
        assert np.array_equal(np.asarray(runner.overlay(img, heat, 0.45, **kw)),
                              np.asarray(maps.overlay(img, heat, 0.45, **zkw)))
    assert runner.Box(1, 2, 3, 4).scaled(2.5, 0.5) == runner.Box(*vars(maps.Box(1, 2, 3, 4).scaled(2.5, 0.5)).values())
