"""Entries in transformers' terms: ``<entry>/hf`` runs in ``pipeline(...)`` with no project import, as the zoo does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_ENV, THREADS_ENV, TINY_VIT
from PIL import Image

import zoo
from training.outputs import HF_DIR, write_native
from zoo import store
from zoo.backbones import ViTBackbone, save_backbone
from zoo.models import LinearClassifier
from zoo.registry import get_entry
from zoo.tasks import get_task

# Runs in a clean interpreter outside the repo: transformers alone, and proof that nothing of ours was imported.
PIPELINE = """
import json, sys
import numpy as np
from transformers import pipeline
task, folder, png = sys.argv[1:]
pipe = pipeline(task, model=folder)
if task == "image-classification":
    out = {d["label"]: d["score"] for d in pipe(png, top_k=pipe.model.config.num_labels)}
else:
    out = np.asarray(pipe(png)).tolist()
assert not any(m.split(".")[0] in ("zoo", "training", "export", "serving") for m in sys.modules), "project imported"
print(json.dumps(out))
"""


def run_pipeline(task: str, folder: Path, png: Path) -> object:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **OFFLINE_ENV, **THREADS_ENV}
    r = subprocess.run([sys.executable, "-c", PIPELINE, task, str(folder), str(png)], cwd=png.parent, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _png(path: Path, size: int, mode: str, seed: int = 0) -> Path:
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _tiny_dinov2(in_chans: int) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(**TINY_VIT, num_channels=in_chans)).eval()


def _probe(entry_name: str) -> tuple[LinearClassifier, object]:
    e = get_entry(entry_name)
    net = LinearClassifier(ViTBackbone(_tiny_dinov2(e.in_chans), "cls+mean"), e.num_outputs).eval()
    torch.nn.init.normal_(net.head.weight, std=0.5)  # a head that separates the classes
    return net, e


def test_linear_probe_entry_has_pipeline_folder(built_linear_breast, tmp_path):
    d = built_linear_breast
    e = get_entry("linear-dinov2-vits14-breastmnist")
    cfg = json.loads((d / HF_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Dinov2ForImageClassification"]
    assert cfg["id2label"] == {str(i): name for i, name in enumerate(e.labels)}
    assert "hf/model.safetensors" in json.loads((d / "config.json").read_text())["sha256"]  # verified on load
    proc = json.loads((d / HF_DIR / "preprocessor_config.json").read_text())
    assert (proc["size"], proc["image_mean"], proc["do_center_crop"]) == (
        {"height": e.input_size, "width": e.input_size}, list(e.mean), False)
    png = _png(tmp_path / "x.png", e.input_size, "RGB")
    scores = run_pipeline("image-classification", d / HF_DIR, png)
    want = zoo.load(d).predict(Image.open(png)).probs[0]  # zoo.load is unchanged: the LinearClassifier path
    assert [scores[name] for name in e.labels] == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", ["finetune-vit-mini-p4-breastmnist",  # grey, binary: one logit z -> [0, z]
                                  "finetune-vit-mini-p4-chestmnist",  # grey, multi-label: sigmoids
                                  "finetune-vit-mini-p4-dermamnist"])  # RGB, multi-class: softmax
def test_probe_pipeline_matches_zoo(name, tmp_path):
    net, e = _probe(name)
    written = write_native(tmp_path, e, net)
    assert set(written) == {"preprocessor_config.json", "hf/config.json", "hf/model.safetensors",
                            "hf/preprocessor_config.json"}
    mode = "L" if e.in_chans == 1 else "RGB"
    png = _png(tmp_path / "x.png", e.input_size, mode)
    scores = run_pipeline("image-classification", tmp_path / HF_DIR, png)
    x = torch.from_numpy(np.array(Image.open(png)))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    with torch.no_grad():
        want = get_task(e.task).probs(net(e.preprocess(x)))[0]
    assert [scores[label] for label in e.labels] == pytest.approx(want.tolist(), abs=1e-4)


def test_no_hf_folder_without_a_transformers_classifier(tmp_path, capsys):
    e = get_entry("finetune-vit-mini-p4-dermamnist")
    net = LinearClassifier(ViTBackbone(_tiny_dinov2(3), "cls"), e.num_outputs)  # CLS only: no HF class reads that
    assert write_native(tmp_path, e, net) == ["preprocessor_config.json"]
    assert not (tmp_path / HF_DIR).exists() and "no hf/ folder" in capsys.readouterr().err


def test_grey_dinomx_backbone(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    e = get_entry("dinomx-vit-mini-p4-breastmnist")
    model = _tiny_dinov2(1)
    save_backbone(model, tmp_path / "backbone", e.mean, e.std, e.input_size)
    png = _png(tmp_path / "x.png", 20, "L")  # another size: the processor resizes, as the zoo does
    # backbone/ keeps one channel: its image processor, used directly, gives the grey model what the zoo does
    proc = AutoImageProcessor.from_pretrained(tmp_path / "backbone")
    px = proc(Image.open(png), return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 1, e.input_size, e.input_size)
    x = torch.from_numpy(np.array(Image.open(png)))[None, None]
    assert torch.allclose(px, e.preprocess(x), atol=0.05)  # PIL's and torch's bilinear resize differ slightly
    with torch.no_grad():
        want = AutoModel.from_pretrained(tmp_path / "backbone")(pixel_values=px).last_hidden_state
    # pipelines convert every image to RGB, so hf/ holds the backbone folded into 3 channels
    assert "hf/model.safetensors" in write_native(tmp_path, e)
    assert json.loads((tmp_path / HF_DIR / "config.json").read_text())["num_channels"] == 3
    got = torch.tensor(run_pipeline("image-feature-extraction", tmp_path / HF_DIR, png))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


def test_student_entry_preprocessor_config(built_resnet18_breast):
    from transformers import AutoImageProcessor

    e = get_entry("baseline-resnet18-breastmnist")
    proc = AutoImageProcessor.from_pretrained(built_resnet18_breast)
    img = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    px = proc(Image.fromarray(img, "L"), return_tensors="pt")["pixel_values"]
    assert torch.allclose(px, e.preprocess(torch.from_numpy(img)[None, None]), atol=1e-6)
    assert set(store.weight_files(built_resnet18_breast)) == {built_resnet18_breast / "model.safetensors"}


def test_registers_backbone_classifier_equals_the_probe(tiny_registers_teacher_dir):
    from zoo.models import to_hf_classifier

    e = get_entry("finetune-vit-mini-p4-dermamnist")
    net = LinearClassifier(ViTBackbone.from_pretrained(tiny_registers_teacher_dir, "cls+mean"), e.num_outputs)
    hf = to_hf_classifier(net, e.labels, e.task)
    assert type(hf).__name__ == "Dinov2WithRegistersForImageClassification"
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():  # registers are skipped by both: the patch mean reads patches only
        assert torch.allclose(hf(pixel_values=x).logits, net(x), atol=1e-5)
