"""ONNX export: every student architecture and the ViT probe export, reproduce torch in plain
onnxruntime (in a process that cannot import the project), and carry parity and accuracy receipts;
FP16/INT8 files run and are measured; localization outputs; the dynamo exporter and its legacy
fallback; uint8-input bundles; gates, adapters, TensorRT, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import OFFLINE_ENV, TASK_FLAG, install, run_cli
from edge_env import FORBIDDEN, edge_site
from PIL import Image

import export
from export import onnx_export as OE
from export import runner
from export.graph import ExportError, merge_adapters
from export.tensorrt import build_engine, onnx_format_for
from zoo.api import NotBuiltError, ZooModel, load
from zoo.cli import main
from zoo.data import load_split, preprocess
from zoo.inference import predict_logits
from zoo.models import create_student
from zoo.registry import get_entry

BUNDLE = {"model.onnx", "preprocess.json", "export.json", "runner.py"}
DYNAMO = {"requested": "dynamo", "used": "dynamo", "fallback": None}
ORT_ONLY = f"""
import json, sys
site, model, x_path, out_path = sys.argv[1:]
sys.path.insert(0, site)
import numpy as np, onnxruntime as ort
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
outs = s.run(None, {{"input": np.load(x_path)}})
np.savez(out_path, *outs)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})))
"""


def run_plain_ort(tmp_path: Path, model: Path, x: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` on ``x`` in ``python -I -S`` with only numpy and onnxruntime importable."""
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "ort_only.py"
    script.write_text(ORT_ONLY)
    r = subprocess.run([sys.executable, "-I", "-S", str(script), str(edge_site(tmp_path)), str(model),
                        str(tmp_path / "x.npy"), str(tmp_path / "y.npz")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    y = np.load(tmp_path / "y.npz")
    return [y[f"arr_{i}"] for i in range(len(y.files))]


def _receipt(d: Path) -> dict:
    return json.loads((d / "export.json").read_text())


def _random_student(arch: str, name: str) -> ZooModel:
    e = get_entry(name)
    torch.manual_seed(0)
    return ZooModel(create_student(arch, e.num_outputs, e.in_chans), e).eval()


# ------------------------------------------------------------------------------------ FP32 parity


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "seresnet50", "skresnet50"])
def test_student_arch_fp32_parity_in_plain_onnxruntime(arch, tmp_path, medmnist_root):
    model = _random_student(arch, f"baseline-{arch}-dermamnist")  # 3 channels, 7 classes
    r = export.to_onnx(model, "onnx", out=tmp_path / "out")
    assert {p.name for p in r.dir.iterdir()} == BUNDLE
    onnx.checker.check_model(str(r.path), full_check=True)
    m = onnx.load(str(r.path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)  # one file
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 28, 28]

    test = load_split("dermamnist", "test")
    torch_logits = predict_logits(model.net, test.images, model.entry.preprocess).numpy()
    (ort_logits,) = run_plain_ort(tmp_path, r.path, preprocess(test.images, model.entry.preprocess).numpy())
    assert np.abs(ort_logits - torch_logits).max() <= 1e-4
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).all()  # the whole test split

    p = r.receipt["parity"]
    assert p["n"] == len(test) and p["max_abs_logit_diff"] <= 1e-4 and p["label_agreement"] == 1.0
    assert r.receipt == _receipt(r.dir) and r.receipt["opset"] == OE.DEFAULT_OPSET
    assert r.receipt["exporter"] == DYNAMO and r.receipt["uint8_input"] is False


@pytest.mark.parametrize("task", list(TASK_FLAG))
def test_trained_run_every_task_fp32_receipt(tiny_runs, task, tmp_path):
    r = export.to_onnx(tiny_runs[task], "onnx", out=tmp_path / "out")
    rec = _receipt(r.dir)
    card = json.loads((tiny_runs[task] / "metrics.json").read_text())["test"]
    acc = rec["accuracy"]
    assert acc["torch"]["acc"] == card["acc"] and abs(acc["torch"]["auc"] - card["auc"]) < 1e-12
    assert acc["exported"]["acc"] == acc["torch"]["acc"] and abs(acc["acc_drop_pt"]) == 0
    assert abs(acc["auc_drop_pt"]) < 1e-3
    assert rec["parity"]["labels_differ"] == 0 and rec["sha256"] and rec["dataset"] == TASK_FLAG[task]
    spec = json.loads((r.dir / "preprocess.json").read_text())
    e = load(tiny_runs[task]).entry
    assert spec["labels"] == list(e.labels) and spec["task"] == task and spec["input_size"] == 28
    assert len(spec["mean"]) == len(spec["std"]) == spec["in_chans"] == e.in_chans


def test_vit_probe_fp32_parity_with_attention(built_linear_breast, tmp_path):
    install(built_linear_breast)
    r = export.to_onnx("linear-dinov2-vits14-breastmnist", "onnx", with_localization=True)
    assert r.dir == Path(os.environ["ZOO_HOME"]) / "linear-dinov2-vits14-breastmnist" / "export" / "onnx"
    onnx.checker.check_model(str(r.path), full_check=True)
    p = r.receipt["parity"]
    assert p["max_abs_logit_diff"] <= 1e-4 and p["label_agreement"] == 1.0 and p["max_abs_attention_diff"] <= 1e-5
    model = load("linear-dinov2-vits14-breastmnist")
    test = load_split("breastmnist", "test")
    x = preprocess(test.images, model.entry.preprocess)
    logits, attn = run_plain_ort(tmp_path, r.path, x.numpy())
    assert np.abs(logits - predict_logits(model.net, test.images, model.entry.preprocess).numpy()).max() <= 1e-4
    assert attn.shape == (len(test), 32, 32)  # linear-* entries see 224 px; / patch 7: the patch grid
    assert np.allclose(attn.sum((1, 2)), 1.0, atol=0.2) and (attn >= 0).all()  # CLS's share of the patches
    with torch.no_grad():  # the head-averaged last-layer CLS attention, from transformers directly
        out = model.net.backbone.model(pixel_values=x[:4], output_attentions=True)
    assert np.allclose(attn[:4], out.attentions[-1][:, :, 0, 1:].mean(1).reshape(4, 32, 32).numpy(), atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_vit_with_registers_exports(tiny_registers_teacher_dir, tmp_path, exporter):
    from zoo.backbones import ViTBackbone
    from zoo.models import LinearClassifier

    e = get_entry("linear-dinov2-vits14-breastmnist")
    torch.manual_seed(0)
    model = ZooModel(LinearClassifier(ViTBackbone.from_pretrained(tiny_registers_teacher_dir), 1), e).eval()
    r = export.to_onnx(model, "onnx", out=tmp_path / "out", with_localization=True, exporter=exporter)
    assert r.receipt["exporter"]["used"] == exporter
    assert r.receipt["parity"]["max_abs_logit_diff"] <= 1e-4
    assert r.receipt["outputs"] == ["logits", "attention"]
    assert r.receipt["parity"]["max_abs_attention_diff"] <= 1e-5  # register tokens skipped as in torch


# ------------------------------------------------------------------------------------ FP16 / INT8


def test_fp16_and_int8_students(built_resnet18_breast, tmp_path):
    install(built_resnet18_breast)
    name = "baseline-resnet18-breastmnist"
    for fmt in ("onnx-fp16", "onnx-int8"):
        r = export.to_onnx(name, fmt)
        assert r.dir == Path(os.environ["ZOO_HOME"]) / name / "export" / fmt
        onnx.checker.check_model(str(r.path), full_check=True)
        rec = _receipt(r.dir)
        assert rec["format"] == fmt and rec["parity_fp32"]["max_abs_logit_diff"] <= 1e-4
        for k in ("torch", "exported", "onnx_fp32"):
            assert {"acc", "auc"} <= set(rec["accuracy"][k])
        assert rec["accuracy"]["acc_drop_pt"] <= max(0.5, 100 / rec["parity"]["n"])
        m = onnx.load(str(r.path))
        ops = {n.op_type for n in m.graph.node}
        if fmt == "onnx-fp16":
            assert onnx.TensorProto.FLOAT16 in {t.data_type for t in m.graph.initializer}
            assert rec["parity"]["max_abs_logit_diff"] < 0.05
        else:
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
            assert rec["quantization"]["mode"] == "static" and rec["quantization"]["calibration"]["images"] == 96
        # the file runs in onnxruntime with the graph's FP32 input and output
        out = OE.session(r.path).run(None, {"input": np.zeros((3, 1, 28, 28), np.float32)})
        assert out[0].shape == (3, 1) and out[0].dtype == np.float32


def test_int8_vit_is_dynamic_and_fp16_vit_runs(built_linear_breast, tmp_path):
    install(built_linear_breast)
    # The tiny random ViT's logits sit at the decision boundary, so INT8 flips labels: no accuracy gate here.
    r = export.to_onnx("linear-dinov2-vits14-breastmnist", "onnx-int8", out=tmp_path / "int8", max_acc_drop=100)
    assert r.receipt["quantization"]["mode"] == "dynamic"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(r.path)).graph.node}
    assert {"acc", "auc"} <= set(r.receipt["accuracy"]["exported"])
    r = export.to_onnx("linear-dinov2-vits14-breastmnist", "onnx-fp16", out=tmp_path / "fp16")
    assert r.receipt["parity"]["label_agreement"] >= 0.95


def test_cnn_cam_output_and_int8_with_cam(tiny_runs, tmp_path):
    d = tiny_runs["multi-class"]  # dermamnist, 7 classes
    r = export.to_onnx(d, "onnx", out=tmp_path / "fp32", with_localization=True)
    assert r.receipt["outputs"] == ["logits", "cam"] and r.receipt["parity"]["max_abs_cam_diff"] <= 1e-4
    model = load(d)
    x = preprocess(load_split("dermamnist", "test").images[:5], model.entry.preprocess)
    logits, cam = OE.session(r.path).run(None, {"input": x.numpy()})
    assert cam.shape == (5, 7, 28, 28)
    with torch.no_grad():  # CAM definition: fc weights on the last feature map (before upsampling)
        feats = model.net.forward_features(x)
        raw = torch.einsum("kf,nfhw->nkhw", model.net.fc.weight, feats)
        assert torch.allclose(raw.mean((2, 3)) + model.net.fc.bias, model.net(x), atol=1e-5)
    assert np.allclose(logits, model.net(x).detach().numpy(), atol=1e-4)

    r = export.to_onnx(d, "onnx-int8", out=tmp_path / "int8", with_localization=True, max_acc_drop=100)
    q = r.receipt["quantization"]
    assert q["op_types"] == ["Conv", "MatMul"]
    g = onnx.load(str(r.path)).graph
    gemm_inputs = {i for n in g.node if n.op_type == "Gemm" for i in n.input}
    dq_outputs = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not gemm_inputs & dq_outputs  # the shared fc weight stays float for the Einsum CAM
    assert "max_abs_cam_diff" in r.receipt["parity"]


# ------------------------------------------------------------------------------------ gates and errors


def test_parity_break_fails_loudly(tiny_runs, tmp_path, monkeypatch):
    real = OE.onnx_runner

    def off_by_a_bit(path):
        run = real(path)
        return lambda x: [o + 1e-3 for o in run(x)]

    monkeypatch.setattr(OE, "onnx_runner", off_by_a_bit)
    out = tmp_path / "out"
    with pytest.raises(OE.ParityError, match=r"max \|logit diff\| 0.001 \(allowed 0.0001\)"):
        export.to_onnx(tiny_runs["binary-class"], "onnx", out=out)
    assert not out.exists()  # nothing written


def test_accuracy_gate_for_quantized_files(tiny_runs, tmp_path, monkeypatch):
    real = OE.onnx_runner
    labels = load_split("breastmnist", "test").labels.numpy()[:, 0]
    calls = []

    def wrong_after_fp32(path):  # the FP32 file passes its check; the INT8 file then gets every image wrong
        calls.append(path)
        if len(calls) == 1:
            return real(path)
        return lambda x: [np.where(labels[: len(x), None] == 1, -10.0, 10.0).astype(np.float32)]

    monkeypatch.setattr(OE, "onnx_runner", wrong_after_fp32)
    assert json.loads((tiny_runs["binary-class"] / "metrics.json").read_text())["test"]["acc"] > 0.1
    out = tmp_path / "out"
    with pytest.raises(OE.ParityError, match=r"onnx-int8 export of .* loses .* pt test ACC against torch"):
        export.to_onnx(tiny_runs["binary-class"], "onnx-int8", out=out)
    assert not out.exists()


def test_bad_inputs_are_clear_errors(tiny_runs, tmp_path):
    with pytest.raises(NotBuiltError, match="zoo build baseline-resnet50-pathmnist"):
        export.to_onnx("baseline-resnet50-pathmnist")
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of onnx, onnx-fp16"):
        export.export(tiny_runs["binary-class"], "tflite")
    for opset in (9, 99):
        with pytest.raises(ExportError, match=f"cannot export opset {opset}: the exporter writes ONNX opsets 13-20"):
            export.to_onnx(tiny_runs["binary-class"], opset=opset)
    with pytest.raises(ExportError, match="takes a zoo name"):
        export.to_onnx(create_student("resnet-test", 1, 1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export.to_onnx(tiny_runs["binary-class"], out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    model = _random_student("resnet-test", "baseline-resnet18-breastmnist")
    with pytest.raises(ExportError, match="not a built store entry; pass out=DIR"):
        export.to_onnx(model)


def test_opset_13_and_re_export_replaces(tiny_runs, tmp_path):
    out = tmp_path / "out"
    r = export.to_onnx(tiny_runs["binary-class"], "onnx", out=out, opset=13)
    assert onnx.load(str(r.path)).opset_import[0].version == 13
    # the dynamo exporter writes opset 18 and later: opset 13 is the legacy exporter's, and the receipt says so
    assert r.receipt["exporter"] == {"requested": "dynamo", "used": "legacy",
                                     "fallback": "opset 13 asked for; the dynamo exporter writes opset 18 and later"}
    r2 = export.to_onnx(tiny_runs["binary-class"], "onnx", out=out, with_localization=True)
    assert r2.receipt["outputs"] == ["logits", "cam"] and _receipt(out)["outputs"] == ["logits", "cam"]


# ------------------------------------------------------------------------------------ exporters


def test_legacy_exporter_is_the_tested_fallback(tiny_runs, tmp_path):
    """``exporter="legacy"`` (TorchScript) and the default dynamo exporter: both pass the same gates, with a
    CAM output, and their files agree with each other."""
    d = tiny_runs["multi-class"]
    files = {}
    for exporter in ("dynamo", "legacy"):
        r = export.to_onnx(d, "onnx", out=tmp_path / exporter, with_localization=True, exporter=exporter)
        assert r.receipt["exporter"] == {"requested": exporter, "used": exporter, "fallback": None}
        p = r.receipt["parity"]
        assert p["max_abs_logit_diff"] <= 1e-4 and p["labels_differ"] == 0 and p["max_abs_cam_diff"] <= 1e-4
        m = onnx.load(str(r.path))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        files[exporter] = r.path
    x = preprocess(load_split("dermamnist", "test").images[:9], load(d).entry.preprocess).numpy()
    a, b = (OE.session(files[k]).run(None, {"input": x}) for k in ("dynamo", "legacy"))
    assert all(np.abs(u - v).max() <= 1e-5 for u, v in zip(a, b))
    with pytest.raises(ExportError, match="unknown exporter 'jit'; choose dynamo or legacy"):
        export.to_onnx(d, exporter="jit")


def test_dynamo_failure_falls_back_to_legacy(tiny_runs, tmp_path, monkeypatch):
    def unsupported(*a, **k):
        raise RuntimeError("unsupported operator aten::fancy_op\nmore details")

    monkeypatch.setattr(OE, "_dynamo_export", unsupported)
    r = export.to_onnx(tiny_runs["binary-class"], "onnx", out=tmp_path / "out")
    ex = r.receipt["exporter"]
    assert ex["requested"] == "dynamo" and ex["used"] == "legacy"
    assert "torch.onnx.export (dynamo) failed" in ex["fallback"] and "aten::fancy_op" in ex["fallback"]
    assert r.receipt["parity"]["max_abs_logit_diff"] <= 1e-4
    with pytest.raises(ExportError, match=r"torch.onnx.export \(legacy\) failed|uint8 preprocessing"):
        export.to_onnx(tiny_runs["binary-class"], "onnx", out=tmp_path / "u8", uint8_input=True)  # needs dynamo


def test_int8_falls_back_to_legacy_when_quantisation_fails_on_the_dynamo_graph(tiny_runs, tmp_path, monkeypatch):
    real, calls = OE.quantize_int8, []

    def fails_on_dynamo(src, *a, **k):
        calls.append(Path(src).name)
        if "dynamo" in Path(src).name:
            raise RuntimeError("[ShapeInferenceError] (test) cannot infer the shape of val_12")
        return real(src, *a, **k)

    monkeypatch.setattr(OE, "quantize_int8", fails_on_dynamo)
    r = export.to_onnx(tiny_runs["binary-class"], "onnx-int8", out=tmp_path / "out", max_acc_drop=100)
    assert calls == ["raw-dynamo.onnx", "raw-legacy.onnx"]
    ex = r.receipt["exporter"]
    assert ex["used"] == "legacy" and ex["fallback"].startswith("INT8 quantisation failed on the dynamo graph "
                                                                "(RuntimeError: [ShapeInferenceError] (test)")
    assert r.receipt["quantization"]["mode"] == "static" and r.receipt["parity_fp32"]["max_abs_logit_diff"] <= 1e-4
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(r.path)).graph.node}
    # a dynamo graph that quantises keeps the dynamo exporter
    monkeypatch.setattr(OE, "quantize_int8", real)
    r = export.to_onnx(tiny_runs["binary-class"], "onnx-int8", out=tmp_path / "out2", max_acc_drop=100)
    assert r.receipt["exporter"] == DYNAMO


# ------------------------------------------------------------------------------------ uint8 input


def _torch_logits(model: ZooModel, images: list[np.ndarray]) -> np.ndarray:
    """``predict``'s path (to_batch + preprocess + net) for (H, W, C) uint8 images, one logit row each."""
    from zoo.inference import to_batch

    return np.concatenate([predict_logits(model.net, t, model.entry.preprocess).numpy()
                           for t in to_batch(images, model.entry.in_chans)])


def _uint8_images(flag: str, c: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real test images at 28 px, and larger ones (the same images enlarged, and noise) that the graph resizes."""
    test = load_split(flag, "test").images[:6].permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(0)
    big = [np.array(Image.fromarray(test[0].squeeze()).resize((64, 64), Image.BILINEAR)),
           np.array(Image.fromarray(test[1].squeeze()).resize((50, 37), Image.NEAREST)),
           np.array(Image.fromarray(test[2].squeeze()).resize((300, 211), Image.BICUBIC)),
           rng.integers(0, 256, (97, 128, c), dtype=np.uint8)]
    return list(test), [b if b.ndim == 3 else b[:, :, None] for b in big]


@pytest.mark.parametrize("task", ["binary-class", "multi-class"])  # grey (breastmnist) and RGB (dermamnist)
def test_uint8_input_bundle_matches_predict(tiny_runs, task, tmp_path):
    d = tiny_runs[task]
    model = load(d)
    e = model.entry
    r = export.to_onnx(d, "onnx", out=tmp_path / "u8", uint8_input=True, with_localization=True)
    g = onnx.load(str(r.path)).graph
    dims = [x.dim_param or x.dim_value for x in g.input[0].type.tensor_type.shape.dim]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", "height", "width", "channels" if e.in_chans == 3 else 1]
    assert [o.name for o in g.output] == ["logits", "cam"]
    spec = json.loads((r.dir / "preprocess.json").read_text())
    assert spec["input_dtype"] == "uint8" and spec["input_layout"] == "NHWC" and spec["preprocessing"] == "in-graph"
    assert spec["input_channels"] == ([1, 3] if e.in_chans == 3 else [1]) and spec["mean"] == list(e.preprocess.mean)
    rec = r.receipt
    assert rec["uint8_input"] and rec["input_dtype"] == "uint8" and rec["exporter"] == DYNAMO
    assert rec["parity"]["max_abs_logit_diff"] <= 1e-4 and rec["parity"]["labels_differ"] == 0
    assert rec["parity_resized"]["size"] == [71, 45] and rec["parity_resized"]["labels_differ"] == 0
    assert rec["parity_resized"]["max_abs_logit_diff"] <= OE.RESIZE_ATOL == rec["gates"]["resize_atol"]

    sess = OE.session(r.path)
    small, big = _uint8_images(TASK_FLAG[task], e.in_chans)
    got = np.concatenate(sess.run(None, {"input": np.stack(small)})[:1])
    want = _torch_logits(model, small)
    assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()
    for im in big:  # one size per run: the graph takes any H x W
        (logit, cam) = sess.run(None, {"input": im[None]})
        ref = _torch_logits(model, [im])
        assert cam.shape == (1, e.num_outputs, 28, 28)
        assert np.abs(logit - ref).max() <= 1e-3, im.shape  # ONNX Runtime's antialiased Resize vs torch's
        assert model.predict(im).labels == [e.labels[i] for i in runner.decide(runner.probabilities(logit, e.task),
                                                                                 e.task)]
    if e.in_chans == 3:  # grey images for an RGB model: replicated in the graph, as predict does
        grey = small[0][:, :, :1]
        assert np.abs(sess.run(None, {"input": grey[None]})[0] - _torch_logits(model, [grey])).max() <= 1e-4


def test_uint8_probe_resizes_28_to_224_in_the_graph(built_linear_breast, tmp_path):
    install(built_linear_breast)
    name = "linear-dinov2-vits14-breastmnist"
    r = export.to_onnx(name, "onnx", uint8_input=True, with_localization=True)
    assert r.dir == Path(os.environ["ZOO_HOME"]) / name / "export" / "onnx-uint8"  # beside the float bundle
    rec = r.receipt
    assert rec["outputs"] == ["logits", "attention"] and rec["parity"]["labels_differ"] == 0
    assert rec["parity"]["max_abs_logit_diff"] <= 1e-4 and rec["parity"]["max_abs_attention_diff"] <= 1e-4
    assert rec["parity_resized"]["size"] == [561, 359] and rec["parity_resized"]["labels_differ"] == 0
    model = load(name)
    small, big = _uint8_images("breastmnist", 1)
    sess = OE.session(r.path)
    for im in small[:2] + big[:2]:
        assert np.abs(sess.run(None, {"input": im[None]})[0] - _torch_logits(model, [im])).max() <= 1e-3


def test_uint8_nearest_resize_is_torchs(tmp_path):
    """Entries that upsample with ``nearest`` (the ``.224`` variants): the graph picks torch's pixels."""
    import dataclasses

    e = dataclasses.replace(get_entry("baseline-resnet18-breastmnist"), resize="nearest", input_size=56)
    torch.manual_seed(0)
    model = ZooModel(create_student("resnet-test", e.num_outputs, e.in_chans), e).eval()
    r = export.to_onnx(model, "onnx", out=tmp_path / "out", uint8_input=True)
    assert r.receipt["parity"]["max_abs_logit_diff"] <= 1e-5
    assert r.receipt["parity_resized"]["max_abs_logit_diff"] <= 1e-5  # 28 -> 140 x 90 -> 56: no Resize weights
    sess = OE.session(r.path)
    for shape in [(56, 56, 1), (13, 200, 1), (97, 61, 1)]:
        im = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert np.abs(sess.run(None, {"input": im[None]})[0] - _torch_logits(model, [im])).max() <= 1e-5


def test_uint8_fp16_and_int8_bundles(tiny_runs, tmp_path):
    d = tiny_runs["binary-class"]
    x = load_split("breastmnist", "test").images[:4].permute(0, 2, 3, 1).numpy()
    for fmt in ("onnx-fp16", "onnx-int8"):
        r = export.to_onnx(d, fmt, out=tmp_path / fmt, uint8_input=True, max_acc_drop=100)
        rec = r.receipt
        assert rec["uint8_input"] and rec["parity_fp32"]["max_abs_logit_diff"] <= 1e-4
        assert rec["accuracy"]["runtime"] == "onnxruntime" and "parity_resized" in rec
        ops = {n.op_type for n in onnx.load(str(r.path)).graph.node}
        assert "Resize" in ops and ("QuantizeLinear" in ops if fmt == "onnx-int8" else True)
        (logits,) = OE.session(r.path).run(None, {"input": x})
        assert logits.shape == (4, 1) and logits.dtype == np.float32
    with pytest.raises(ExportError, match="uint8 input needs opset 18 or later"):
        export.to_onnx(d, "onnx", out=tmp_path / "o17", uint8_input=True, opset=17)
    with pytest.raises(ExportError, match="--uint8-input applies to the ONNX formats"):
        export.export(d, "tensorrt", uint8_input=True)


# ------------------------------------------------------------------------------------ adapters


class _FakeLoraLinear(nn.Module):
    """Stands in for a peft model (its class lives in a ``peft.*`` module) where peft is not installed."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.full_like(base.weight, 0.01))

    def forward(self, x):
        return nn.functional.linear(x, self.base.weight + self.delta, self.base.bias)

    def merge_and_unload(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.delta
        return self.base


_FakeLoraLinear.__module__ = "peft.tuners.fake"


def test_adapters_are_merged_before_export(tiny_runs, tmp_path):
    model = load(tiny_runs["binary-class"])
    want = model.net.fc.weight.detach().clone() + 0.01
    model.net.fc = _FakeLoraLinear(model.net.fc)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model.net(x)
    merged = merge_adapters(model.net)
    assert isinstance(merged.fc, nn.Linear) and torch.equal(merged.fc.weight, want)
    assert isinstance(model.net.fc, _FakeLoraLinear)  # the caller's model keeps its adapter
    r = export.to_onnx(model, "onnx", out=tmp_path / "out")
    (logits,) = OE.session(r.path).run(None, {"input": x.numpy()})
    assert np.abs(logits - before.numpy()).max() <= 1e-4


def test_peft_lora_vit_exports_merged(built_linear_breast, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (LoRA arrives with the DINO-MX backend)")
    model = load(built_linear_breast)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "q_proj", "v_proj"])
    model.net.backbone.model = peft.get_peft_model(model.net.backbone.model, cfg)
    for n, p in model.net.backbone.model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)  # non-zero adapters, so merging changes the weights
    r = export.to_onnx(model, "onnx", out=tmp_path / "out")
    assert r.receipt["parity"]["max_abs_logit_diff"] <= 1e-4
    assert "lora" not in " ".join(t.name for t in onnx.load(str(r.path)).graph.initializer).lower()


# ------------------------------------------------------------------------------------ TensorRT


def test_tensorrt_unavailable_is_a_clear_error(tiny_runs, monkeypatch):
    monkeypatch.setattr("export.tensorrt.tensorrt_status", lambda: (False, "TensorRT is not installed (test)"))
    with pytest.raises(export.TensorRTUnavailableError, match=r"cannot build a TensorRT engine here: TensorRT is not "
                                                             r"installed \(test\)\. Export ONNX instead"):
        export.export(tiny_runs["binary-class"], "tensorrt")
    with pytest.raises(ExportError, match="precision must be one of fp32, fp16, int8"):
        export.to_tensorrt(tiny_runs["binary-class"], precision="int4")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine(tiny_runs, tmp_path, precision):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'medzoo[tensorrt]' (Linux + GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    r = export.to_tensorrt(tiny_runs["multi-class"], out=tmp_path / "trt", precision=precision)
    rec = r.receipt
    assert r.path.name == "model.engine" and (r.dir / "model.onnx").is_file()
    assert rec["tensorrt"]["strongly_typed"] == (int(rec["tensorrt"]["version"].split(".")[0]) >= 11)
    assert rec["accuracy"]["acc_drop_pt"] <= max(0.5, 100 / rec["parity"]["n"])
    if precision == "fp32":
        assert rec["parity"]["max_abs_logit_diff"] <= 1e-3


def test_onnx_source_per_tensorrt_version():
    assert [onnx_format_for(p, 11) for p in ("fp32", "fp16", "int8")] == ["onnx", "onnx-fp16", "onnx-int8"]
    assert [onnx_format_for(p, 10) for p in ("fp32", "fp16", "int8")] == ["onnx", "onnx", "onnx-int8"]


def test_tensorrt_builder_paths_with_a_fake_tensorrt(tmp_path, monkeypatch):
    """The build code takes TensorRT 11's strongly typed path and 10.x's builder-flag path."""
    calls = []

    class Obj:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, attr):
            def method(*a, **k):
                calls.append((self._name, attr, a))
                if attr == "parse_from_file":
                    return True
                if attr == "get_input":
                    return types.SimpleNamespace(name="input")
                if attr == "build_serialized_network":
                    return b"engine"
                return Obj(attr)
            return method

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    for version in ("11.4.0", "10.13.3"):
        calls.clear()
        trt = types.SimpleNamespace(
            __version__=version, Logger=Logger, Builder=lambda logger: Obj("builder"),
            OnnxParser=lambda network, logger: Obj("parser"),
            NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5),
            BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32"),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WS"))
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
        info = build_engine(Path("m.onnx"), tmp_path / "e.engine", "int8", (1, 28, 28))
        assert (tmp_path / "e.engine").read_bytes() == b"engine"
        flags = [c[2][0] for c in calls if c[1] == "set_flag"]
        net = next(c for c in calls if c[1] == "create_network")
        profile = next(c for c in calls if c[1] == "set_shape")
        assert profile[2] == ("input", (1, 1, 28, 28), (8, 1, 28, 28), (64, 1, 28, 28))
        if version.startswith("11"):
            assert info["strongly_typed"] and net[2] == (1 << 5,) and flags == []
        else:
            assert not info["strongly_typed"] and net[2] == (0,) and flags == ["FP16", "INT8"]


# ------------------------------------------------------------------------------------ CLI


def test_cli_export_subprocess_and_errors(built_resnet18_breast, capsys):
    install(built_resnet18_breast)
    env = {k: os.environ[k] for k in ("ZOO_HOME", "MEDMNIST_ROOT")}
    r = run_cli("export", "baseline-resnet18-breastmnist", "--format", "onnx-int8", env={**env, **OFFLINE_ENV})
    assert r.returncode == 0, r.stderr
    d = Path(env["ZOO_HOME"]) / "baseline-resnet18-breastmnist" / "export" / "onnx-int8"
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"exported baseline-resnet18-breastmnist as onnx-int8 to {d / 'model.onnx'}: onnxruntime "
                           "test acc ")
    assert "labels agree on" in last and BUNDLE <= {p.name for p in d.iterdir()}

    bad = {  # exit status 2: bad arguments; 1: what they name cannot be exported here
        "unbuilt": (["export", "baseline-resnet50-pathmnist"], "zoo build baseline-resnet50-pathmnist", 1),
        "format": (["export", "baseline-resnet18-breastmnist", "--format", "coreml"], "unknown export format 'coreml'",
                   2),
        "opset": (["export", "baseline-resnet18-breastmnist", "--opset", "42"], "cannot export opset 42", 2),
        "precision": (["export", "baseline-resnet18-breastmnist", "--precision", "fp16"], "--precision applies to", 2),
        "tensorrt": (["export", "baseline-resnet18-breastmnist", "--format", "tensorrt"], "TensorRT engine here", 1),
    }
    for why, (argv, msg, status) in bad.items():
        if why == "tensorrt" and export.tensorrt_status()[0]:
            continue
        assert main(argv) == status, why
        err = capsys.readouterr().err
        assert err.startswith("zoo: error: ") and err.count("\n") == 1 and msg in err, (why, err)
