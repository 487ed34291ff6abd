"""Teachers that can win offline and the ways to use them: ensembles of students, classifier teachers, the
teacher-strength gate, alpha/t chosen on validation, CA-MKD (against its formula), augmentation and EMA."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_overrides

import zoo
from training.entries import train_config
from training.medalmighty.losses import CAMKDLoss, confidence_weights, per_sample_kd
from training.medalmighty.recipe import TeacherTooWeakError


def _train(tmp_path, method: str, flag: str = "breastmnist", *extra: str):
    return train_config("medalmighty/default.yaml", tiny_overrides(method, flag, tmp_path, *extra), progress=False)


def _read(d):
    return json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text())


@pytest.fixture(scope="module")
def students(tmp_path_factory, session_env):
    """Two plain tiny students of BreastMNIST (seeds 0 and 1) and the ensemble assembled from them."""
    out = tmp_path_factory.mktemp("students")
    a = _train(out, "baseline", "breastmnist", "seed=0")
    b = _train(out, "baseline", "breastmnist", "seed=1")
    ens = _train(out, "ensemble", "breastmnist", f"ensemble.members=[{a}, {b}]", "run_name=ens")
    return a, b, ens


def test_an_ensemble_averages_its_members_logits(students):
    a, b, ens = students
    cfg, metrics = _read(ens)
    assert cfg["entry"]["method"] == "ensemble" and len(metrics["members"]) == 2
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        want = (zoo.load(a).net(x) + zoo.load(b).net(x)) / 2
        torch.testing.assert_close(zoo.load(ens).net(x), want)
    assert {m["source"] for m in cfg["lineage"]["members"]} == {str(a), str(b)}
    assert "Member:" in (ens / "README.md").read_text()


def test_training_the_members_here_equals_plain_runs_of_their_seeds(students, tmp_path):
    a, b, _ = students
    ens = _train(tmp_path, "ensemble", "breastmnist", "ensemble.size=2", "run_name=trained")
    net = zoo.load(ens).net
    for member, plain in zip(net.members, (a, b)):
        want = zoo.load(plain).net.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in member.state_dict().items())


def test_a_student_distils_from_a_classifier_teacher(students, tmp_path):
    _, _, ens = students
    d = _train(tmp_path, "medalmighty", "breastmnist", f"teacher.backbone={ens}")
    cfg, metrics = _read(d)
    assert cfg["lineage"]["teacher_kind"] == "ensemble" and cfg["lineage"]["teacher_backbone"] == str(ens)
    _, ens_metrics = _read(ens)
    assert metrics["teacher"]["test"]["acc"] == pytest.approx(ens_metrics["test"]["acc"], abs=1e-9)
    assert all(h["kd"] > 0 for h in metrics["history"])
    gate = metrics["teacher_gate"]
    assert gate["reference"] == "the majority class" and gate["reference_val"]["auc"] == 0.5


def test_a_weaker_teacher_warns_and_can_be_refused(built_resnet18_breast, tiny_teacher_dir, capsys):
    from conftest import install

    install(built_resnet18_breast)  # the plain twin: what the distilled student has to beat
    name = "medalmighty-resnet18-breastmnist"
    args = [f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=1", "train.epochs=1", "train.progress=false",
            "data.download=false"]
    d = zoo.build(name, args, progress=False)  # a random tiny ViT + a 1-epoch probe: a weak teacher
    _, metrics = _read(d)
    gate = metrics["teacher_gate"]
    assert gate["reference"] == "baseline-resnet18-breastmnist (built)" and not gate["stronger"]
    err = capsys.readouterr().err
    assert "zoo: warning:" in err and "weaker than baseline-resnet18-breastmnist (built)" in err
    assert "**weaker**" in (d / "README.md").read_text()
    before = (d / "model.safetensors").read_bytes()
    with pytest.raises(TeacherTooWeakError, match="require_stronger_teacher"):
        zoo.build(name, [*args, "distill.require_stronger_teacher=true"], progress=False)
    assert (d / "model.safetensors").read_bytes() == before  # the refused build replaced nothing


def test_alpha_and_temperature_are_chosen_on_validation(students, tmp_path):
    _, _, ens = students
    d = _train(tmp_path, "medalmighty", "breastmnist", f"teacher.backbone={ens}", "distill.search=grid",
               "distill.grid=[[2.0, 0.2], [8.0, 0.8]]")
    cfg, metrics = _read(d)
    grid = metrics["search"]["grid"]
    assert [(g["temperature"], g["alpha"]) for g in grid] == [(2.0, 0.2), (8.0, 0.8)]
    best = max(grid, key=lambda g: g["val"]["auc"])
    assert metrics["search"]["chosen"] == {"temperature": best["temperature"], "alpha": best["alpha"]}
    assert metrics["val"]["auc"] == pytest.approx(best["val"]["auc"], abs=1e-9)  # the saved student is that one
    assert "chosen by validation AUC" in (d / "README.md").read_text()


def test_the_search_grid_is_the_papers_table_4():
    from training.config import load_config
    from zoo.anchors import read

    grid = load_config(None, family="medalmighty")["distill"]["grid"]
    pairs = sorted({(float(r["temperature"]), float(r["alpha"])) for r in read("medalmighty_table4_ablation.csv")})
    assert sorted(map(tuple, grid)) == pairs


# --- CA-MKD ---------------------------------------------------------------------------------------


def test_camkd_weights_follow_each_teachers_cross_entropy():
    torch.manual_seed(0)
    y = torch.tensor([[0], [2], [1], [0]])
    logits = torch.randn(3, 4, 3)
    w = confidence_weights(logits, y, "multi-class")
    ce = torch.stack([F.cross_entropy(lg, y[:, 0], reduction="none") for lg in logits])
    want = (1 - torch.softmax(ce, dim=0)) / 2
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(w.sum(dim=0), torch.ones(4))
    # the teacher that is right about a sample weighs most on it
    good = torch.full((4, 3), -5.0)
    good[torch.arange(4), y[:, 0]] = 5.0
    w2 = confidence_weights(torch.stack([good, -good]), y, "multi-class")
    assert (w2[0] > w2[1]).all()


def test_camkd_loss_against_its_formula():
    torch.manual_seed(1)
    n, c, d_s = 6, 3, 8
    heads = [nn.Linear(5, c), nn.Linear(4, c)]
    loss = CAMKDLoss("multi-class", heads, d_s, alpha=0.3, temperature=2.0, beta=10.0)
    student_fc = nn.Linear(d_s, c)
    loss.capture(student_fc)
    f_s = torch.randn(n, d_s)
    s = student_fc(f_s)
    y = torch.randint(0, c, (n, 1))
    t_logits = torch.randn(2, n, c)
    t_feats = [torch.randn(n, 5), torch.randn(n, 4)]
    out = loss(s, y, {"logits": t_logits, "features": t_feats})
    w = confidence_weights(t_logits, y, "multi-class")
    kd = sum((w[k] * per_sample_kd(s, t_logits[k], "multi-class", 2.0)).sum() for k in range(2)) / (n * 2)
    proj = [p(f_s) for p in loss.projectors]
    v = confidence_weights(torch.stack([h(z) for h, z in zip(heads, proj)]), y, "multi-class")
    feat = sum((v[k] * ((proj[k] - t_feats[k]) ** 2).mean(dim=1)).sum() for k in range(2)) / (n * 2)
    want = 0.3 * F.cross_entropy(s, y[:, 0]) + 0.7 * 4.0 * kd + 10.0 * feat
    torch.testing.assert_close(out["loss"], want)
    # the student and the projectors get gradients; the teachers' heads stay frozen
    out["loss"].backward()
    assert student_fc.weight.grad is not None and loss.projectors[0].weight.grad is not None
    assert all(p.grad is None for p in loss.heads.parameters())


def test_camkd_trains_end_to_end_from_two_teachers(students, tmp_path):
    a, b, _ = students
    d = _train(tmp_path, "camkd", "breastmnist", f"teacher.backbone=[{a}, {b}]", "distill.feature_weight=1.0")
    cfg, metrics = _read(d)
    assert cfg["entry"]["method"] == "camkd" and len(cfg["lineage"]["teachers"]) == 2
    assert len(metrics["teacher"]) == 2 and all(h["kd"] > 0 for h in metrics["history"])
    assert zoo.load(d).predict(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).probs.shape == (2, 2)
    with pytest.raises(ValueError, match="at least 2 teachers"):
        _train(tmp_path, "camkd", "breastmnist", f"teacher.backbone=[{a}]")


# --- augmentation and EMA ---------------------------------------------------------------------------


def test_light_augmentation_and_ema_train_and_are_recorded(tmp_path):
    plain = _train(tmp_path / "p", "baseline", "breastmnist")
    aug = _train(tmp_path / "a", "baseline", "breastmnist", "train.augment=light", "train.ema=0.9")
    _, mp = _read(plain)
    cfg, ma = _read(aug)
    assert cfg["config"]["train"]["augment"] == "light" and cfg["config"]["train"]["ema"] == 0.9
    assert [h["loss"] for h in ma["history"]] != [h["loss"] for h in mp["history"]]
    card = (aug / "README.md").read_text()
    assert "light augmentation" in card and "weights EMA 0.9" in card
    # the saved weights are the EMA's: not those of the last optimizer step of an identical run without EMA
    no_ema = _train(tmp_path / "n", "baseline", "breastmnist", "train.augment=light")
    wa, wn = zoo.load(aug).net.state_dict(), zoo.load(no_ema).net.state_dict()
    assert any(not torch.equal(wa[k], wn[k]) for k in wa if wa[k].is_floating_point())


def test_a_hub_style_patch14_teacher_sees_224_px_while_the_student_keeps_28(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    hub = tmp_path / "dinov2-like"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=518)).save_pretrained(hub)  # DINOv2's hub config: 518
    (hub / "preprocessor_config.json").write_text(json.dumps({  # and its processor: resize 256, crop 224
        "image_processor_type": "BitImageProcessor", "crop_size": {"height": 224, "width": 224},
        "size": {"shortest_edge": 256}, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    d = _train(tmp_path, "medalmighty", "breastmnist", f"teacher.backbone={hub}", "probe.epochs=1")
    cfg, _ = _read(d)
    assert cfg["lineage"]["teacher_input_size"] == 224 and cfg["config"]["teacher"]["input_size"] == 224
    assert "crop_size" in cfg["lineage"]["teacher_resolution"]
    assert cfg["entry"]["input_size"] == 28 and cfg["config"]["data"]["input_size"] == 28
    assert "at 224 px" in (d / "README.md").read_text()


def test_a_finetuned_vit_teacher_trains_end_to_end_and_teaches_with_its_own_head(tiny_teacher_dir, tmp_path):
    from transformers import AutoModel

    ft = _train(tmp_path, "finetune", "breastmnist", f"teacher.backbone={tiny_teacher_dir}", "probe.epochs=2",
                "train.optimizer=adamw", "train.lr=1e-3", "run_name=ft")
    cfg, metrics = _read(ft)
    assert cfg["entry"]["method"] == "finetune" and cfg["lineage"]["teacher_backbone"] == str(tiny_teacher_dir)
    assert cfg["lineage"]["probe_val"] is not None and len(metrics["history"]) == 2
    before, after = AutoModel.from_pretrained(tiny_teacher_dir).state_dict(), zoo.load(ft).net.backbone.model
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "fine-tuning left the backbone as it was"
    assert "fine-tuned end to end" in (ft / "README.md").read_text()
    d = _train(tmp_path, "medalmighty", "breastmnist", f"teacher.backbone={ft}", "run_name=from-ft")
    lin, student = _read(d)
    assert lin["lineage"]["teacher_backbone"] == str(ft) and "finetune entry" in lin["lineage"]["teacher_resolution"]
    # its own head teaches (no probe trained here): the teacher's figures are the fine-tuned entry's
    assert student["teacher"]["test"]["acc"] == pytest.approx(metrics["test"]["acc"], abs=1e-9)
    assert student["teacher"]["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
