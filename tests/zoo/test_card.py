"""Model cards: the Hub's front matter read back with huggingface_hub, and the body's figures from the folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard, metadata_load
from safetensors.numpy import save_file

from zoo.card import folder_facts, hub_license, is_hub_id, receipt_latency, render_card
from zoo.registry import get_entry

SHA = "ab" * 32


def _config(entry, lineage=None, **sha):
    return {"entry": entry.to_dict(), "created": "2026-01-02T03:04:05+00:00", "lineage": lineage or {},
            "sha256": sha or {"model.safetensors": SHA},
            "config": {"train": {"lr": 0.001, "batch_size": 128, "schedule": "multistep", "amp": "none"},
                       "probe": {"lr": 0.001, "batch_size": 256},
                       "data": {"dataset": entry.dataset, "size": 28},
                       "distill": {"alpha": 0.2, "temperature": 2.0}}}


def _metrics(**extra):
    return {"val": {"acc": 0.81234, "auc": 0.9}, "test": {"acc": 0.75, "auc": 0.8765}, "best_epoch": 3,
            "epochs": 4, "seed": 0, "wall_time_s": 12.0, "train_time_s": 10.0, **extra}


def _write_entry(tmp_path, entry, config, metrics, exports=None):
    d = tmp_path / entry.name
    d.mkdir()
    save_file({"w": np.zeros((10, 3), np.float32), "b": np.zeros(10, np.float32)}, str(d / "model.safetensors"))
    if "teacher_head.safetensors" in config["sha256"]:
        save_file({"w": np.zeros((2, 7), np.float32)}, str(d / "teacher_head.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.json").write_text(json.dumps(metrics))
    for fmt, receipt in (exports or {}).items():
        b = d / "export" / fmt
        b.mkdir(parents=True)
        (b / "model.onnx").write_bytes(b"\0" * 1000)
        (b / "export.json").write_text(json.dumps(receipt))
    return d


def test_front_matter_read_back_by_huggingface_hub(tmp_path):
    e = get_entry("medalmighty-resnet18-dermamnist")
    card = render_card(e, _config(e), _metrics())
    path = tmp_path / "README.md"
    path.write_text(card)
    meta = metadata_load(path)
    assert meta["license"] == "cc-by-nc-4.0"  # DermaMNIST is CC BY-NC 4.0
    assert meta["datasets"] == ["albertvillanova/medmnist-v2"]
    assert meta["library_name"] == "medzoo" and meta["pipeline_tag"] == "image-classification"
    assert meta["base_model"] == "facebook/dinov2-base"  # the teacher, a Hub id
    assert {"medical-imaging", "medmnist", "dermamnist", "multi-class", "knowledge-distillation"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    assert index["name"] == e.name
    by_split = {r["dataset"]["split"]: r for r in index["results"]}
    assert set(by_split) == {"validation", "test"}
    test = by_split["test"]
    assert test["task"]["type"] == "image-classification"
    assert test["dataset"] == {"name": "MedMNIST v2 dermamnist", "type": "albertvillanova/medmnist-v2",
                               "config": "dermamnist", "split": "test"}
    assert {m["type"]: m["value"] for m in test["metrics"]} == {"accuracy": 0.75, "roc_auc": 0.8765}
    # ModelCard parses it into EvalResults, and the Markdown body starts with the title
    mc = ModelCard.load(path)
    assert mc.data.license == "cc-by-nc-4.0"
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in mc.data.eval_results}
    assert got == {("validation", "accuracy"): 0.81234, ("validation", "roc_auc"): 0.9, ("test", "accuracy"): 0.75,
                   ("test", "roc_auc"): 0.8765}
    assert mc.text.startswith(f"# {e.name}\n")


def test_body_keeps_what_the_build_tests_read():
    e = get_entry("medalmighty-resnet18-breastmnist")
    lineage = {"teacher_backbone": "/models/dinov2", "teacher_sha256": "cd" * 32, "pooling": "cls+mean",
               "teacher_input_size": 224}
    m = _metrics(teacher={"val": {"acc": 0.9, "auc": 0.95}, "test": {"acc": 0.88, "auc": 0.93}})
    card = render_card(e, _config(e, lineage), m)
    assert "| test | 0.7500 | 0.8765 |" in card and "| val | 0.8123 | 0.9000 |" in card
    assert "## Lineage" in card and "`/models/dinov2`" in card and "Teacher on the same splits" in card
    assert "Loss: 0.2 * task + (1 - 0.2) * 2.0^2 * KL" in card
    assert f"- `model.safetensors` sha256 `{SHA}`" in card
    assert "Research use only" in card and "CC BY 4.0" in card
    assert "## Size and speed" not in card  # no folder given: nothing measured from files


def test_sizes_parameters_and_export_latency_from_the_folder(tmp_path):
    e = get_entry("medalmighty-resnet18-breastmnist")
    cfg = _config(e, **{"model.safetensors": SHA, "teacher_head.safetensors": "ef" * 32})
    exports = {"onnx": {"format": "onnx", "accuracy": {"exported": {"acc": 0.75, "auc": 0.87}}},
               "onnx-int8": {"format": "onnx-int8", "latency": {"ms": 0.42, "batch": 1, "threads": 2}}}
    d = _write_entry(tmp_path, e, cfg, _metrics(), exports)
    facts = folder_facts(d, cfg)
    assert facts["parameters"] == 40  # model.safetensors: 10 x 3 + 10; the teacher's head is not the model's
    assert facts["weights_bytes"] == (d / "model.safetensors").stat().st_size
    assert [w["path"] for w in facts["weights"] if not w["model"]] == ["teacher_head.safetensors"]
    assert [(x["format"], x["bytes"], x["files"]) for x in facts["exports"]] == [
        ("onnx", 1000 + (d / "export/onnx/export.json").stat().st_size, 2),
        ("onnx-int8", 1000 + (d / "export/onnx-int8/export.json").stat().st_size, 2)]
    assert facts["latency"] == {"format": "onnx-int8", "ms": 0.42, "batch": 1, "threads": 2}
    files = {f["path"]: f for f in facts["files"]}
    assert files["model.safetensors"]["sha256"] == SHA and "sha256" not in files["metrics.json"]

    card = render_card(e, cfg, _metrics(), folder=d, repo_id="org/medalmighty-breast")
    size = (d / "model.safetensors").stat().st_size
    assert f"- Parameters: 40 in `model.safetensors`; weights {size / 1e6:.2f} MB." in card
    assert "`teacher_head.safetensors` (14 parameters" in card
    assert "| `export/onnx-int8/` | 2 |" in card and "0.42 ms/image (batch 1, threads 2)" in card
    assert "| `export/onnx/` | 2 |" in card and "| 0.7500 | not measured |" in card
    assert f"- `model.safetensors` ({size / 1e6:.2f} MB) sha256 `{SHA}`" in card
    assert 'zoo.load("hf-hub:org/medalmighty-breast")' in card


def test_backbone_card_is_a_feature_extractor(tmp_path):
    e = get_entry("dinomx-vit-mini-p4-bloodmnist")
    cfg = {"entry": e.to_dict(), "created": "now", "sha256": {"backbone/model.safetensors": SHA},
           "lineage": {"backbone_source": "facebook/dinov2-small", "datasets": ["bloodmnist"]},
           "config": {"method": "dinov2", "dino": {"loss_weight": 1}, "ibot": {"loss_weight": 1},
                      "koleo": {"loss_weight": 0.1}, "gram": {"loss_weight": 0},
                      "optim": {"batch_size": 64, "lr": 0.0005}, "crops": {"local_number": 6}}}
    m = {"knn": {"bloodmnist": {"val": {"acc": 0.9, "auc": 0.98}, "test": {"acc": 0.905, "auc": 0.987}}},
         "linear": {"bloodmnist": {"test": {"acc": 0.918, "auc": 0.993}}}, "eval": {"k": 11, "temperature": 0.07}}
    card = ModelCard(render_card(e, cfg, m))
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.base_model == "facebook/dinov2-small" and card.data.license == "cc-by-4.0"
    assert {"dino", "self-supervised", "bloodmnist"} <= set(card.data.tags)
    got = {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert got[("test", "kNN test ACC")] == 0.905 and got[("test", "linear test AUC")] == 0.993
    assert ("validation", "linear val ACC") not in got  # not measured: left out, not written as null
    assert "| bloodmnist | test | 0.9050 | 0.9870 | 0.9180 | 0.9930 |" in card.text


@pytest.mark.parametrize("text, want", [
    ("CC BY 4.0", {"license": "cc-by-4.0"}),
    ("CC BY-NC 4.0", {"license": "cc-by-nc-4.0"}),
    ("CC BY-NC-SA 4.0", {"license": "cc-by-nc-sa-4.0"}),
    ("CC0 1.0", {"license": "cc0-1.0"}),
    ("see medmnist.com", {"license": "other", "license_name": "see-medmnist.com", "license_link": "https://medmnist.com/"}),
])
def test_licence_ids(text, want):
    assert hub_license(text) == want


def test_base_model_only_for_hub_ids(tmp_path):
    assert is_hub_id("facebook/dinov2-base")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("dinomx-vit-mini-p4-bloodmnist") and not is_hub_id(None)
    e = get_entry("medalmighty-resnet18-bloodmnist.dinomx-28")  # our own backbone as teacher: a zoo name
    assert "base_model" not in ModelCard(render_card(e, _config(e), _metrics())).data.to_dict()


def test_receipt_latency_forms():
    assert receipt_latency({}) is None and receipt_latency({"latency": None}) is None
    assert receipt_latency({"latency": 1.5}) == {"ms": 1.5}
    assert receipt_latency({"latency": {"p50_ms": 2, "device": "cpu", "other": 1}}) == {"ms": 2.0, "device": "cpu"}
    assert receipt_latency({"latency": {"ms": {"ort": 1}}}) is None  # not a figure this card can read
