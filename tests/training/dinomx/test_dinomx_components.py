"""DINO-MX components against their formulas: heads, losses, masking, crops, backbones, strategies, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.dinomx.config import HeadConfig
from training.dinomx.crops import CropConfig, MultiCrop, guide_boxes, sample_boxes
from training.dinomx.heads import DINOHead
from training.dinomx.losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from training.dinomx.masking import batch_masks, block_mask
from training.dinomx.model import SSLModel, apply_lora, freeze, param_groups
from training.schedules import cosine, teacher_temperature
from zoo.backbones import (
    NAMED_CONFIGS,
    BackboneError,
    ViTBackbone,
    adapt_channels,
    attention_linear_names,
    blocks,
    create_model,
    patch_embedding,
)

HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "nlayers": 3, "norm_last_layer": True}
HEAD_CONFIG = HeadConfig(**HEAD, ibot_separate_head=False)


# -- head ----------------------------------------------------------------------------------------
def test_dino_head_prototypes_have_unit_norm_and_frozen_gain():
    h = DINOHead(24, out_dim=50, hidden_dim=32, bottleneck_dim=8, nlayers=3, norm_last_layer=True)
    out = h(torch.randn(5, 24))
    assert out.shape == (5, 50)
    w = h.last_layer.weight  # the weight-normed (g * v / |v|) matrix
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)
    assert not h.last_layer.parametrizations.weight.original0.requires_grad
    # scores are cosines between the L2-normalised bottleneck and unit prototypes
    assert out.abs().max() <= 1 + 1e-5
    free = DINOHead(24, out_dim=50, nlayers=1, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(24, nlayers=0)


# -- DINO loss -----------------------------------------------------------------------------------
def _dino_reference(student, teacher, center, s_temp, t_temp):
    tp = F.softmax((teacher - center) / t_temp, dim=-1)
    total, n = 0.0, 0
    for i in range(teacher.shape[0]):
        for j in range(student.shape[0]):
            if i == j:
                continue
            total += -(tp[i] * F.log_softmax(student[j] / s_temp, dim=-1)).sum(-1).mean()
            n += 1
    return total / n


def test_dino_loss_matches_formula_and_updates_center():
    torch.manual_seed(0)
    loss = DINOLoss(10, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, 10) * 0.1)
    center0 = loss.center.clone()
    student, teacher = torch.randn(5, 4, 10), torch.randn(2, 4, 10)
    probs = loss.teacher_probs(teacher, 0.04)
    got = loss(student, probs)
    want = _dino_reference(student, teacher, center0, 0.1, 0.04)
    assert torch.allclose(got, want, atol=1e-6)
    # EMA center: 0.9 * old + 0.1 * mean of the teacher logits over crops and images
    assert torch.allclose(loss.center, 0.9 * center0 + 0.1 * teacher.reshape(-1, 10).mean(0, keepdim=True), atol=1e-6)


def test_dino_loss_needs_two_crops_and_valid_centering():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(4, centering="mean")
    loss = DINOLoss(4)
    t = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="two crops"):
        loss(torch.randn(1, 3, 4), loss.teacher_probs(t, 0.1))


def test_sinkhorn_knopp_equipartition():
    torch.manual_seed(0)
    scores = torch.randn(32, 8)
    q = sinkhorn_knopp(scores, temp=0.1, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(32), atol=1e-5)  # each sample a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 32 / 8), atol=1e-2)  # prototypes equally used
    # invariant to adding a constant (the max subtraction is safe) and stable for large scores
    assert torch.allclose(sinkhorn_knopp(scores + 100, 0.1), sinkhorn_knopp(scores, 0.1), rtol=1e-3, atol=1e-6)
    assert torch.isfinite(sinkhorn_knopp(scores * 1e3, 0.01)).all()
    loss = DINOLoss(8, centering="sinkhorn")
    assert torch.allclose(loss.teacher_probs(scores.view(2, 16, 8), 0.1), sinkhorn_knopp(scores, 0.1).view(2, 16, 8))
    assert torch.all(loss.center == 0)  # Sinkhorn does not use the center


# -- iBOT ----------------------------------------------------------------------------------------
def test_ibot_loss_matches_formula():
    torch.manual_seed(0)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)  # 3 images, 2 masked
    m = int(masks.sum())
    s, t = torch.randn(m, 6), torch.randn(m, 6)
    loss = IBOTPatchLoss(6, student_temp=0.1)
    tp = loss.teacher_probs(t, 0.05)
    weights = 1.0 / masks.sum(1, keepdim=True).expand_as(masks)[masks].float()
    got = loss(s, tp, weights, n_images=3)
    ce = -(F.softmax(t / 0.05, -1) * F.log_softmax(s / 0.1, -1)).sum(-1)
    want = (ce[:2].mean() + ce[2:].mean()) / 3  # each masked image counts once, over all 3 images
    assert torch.allclose(got, want, atol=1e-6)
    empty = loss(torch.zeros(0, 6, requires_grad=True), torch.zeros(0, 6), torch.zeros(0), 3)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_masked_patches_reach_the_student_masked():
    """Pixels under masked patches cannot influence anything: the mask token replaced them."""
    torch.manual_seed(0)
    for name in ("vit-test", "dinov3-test", "hfvit-test", "vitreg-test"):
        enc = ViTBackbone(create_model(name, in_chans=1), pooling="cls")
        model = SSLModel(enc, HEAD_CONFIG).eval()
        x = torch.randn(2, 1, 28, 28)
        masks = torch.zeros(2, 49, dtype=torch.bool)
        masks[:, [0, 8, 30]] = True  # patches (0,0), (1,1), (4,2) of the 7 x 7 grid
        x2 = x.clone()
        for p in (0, 8, 30):
            r, c = divmod(p, 7)
            x2[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5 * torch.randn(2, 1, 4, 4)
        with torch.no_grad():
            a, b = model(x, masks=masks), model(x2, masks=masks)
            u, v = model(x), model(x2)
        assert torch.allclose(a["cls"], b["cls"], atol=1e-5), name
        assert torch.allclose(a["ibot"], b["ibot"], atol=1e-5), name
        assert a["ibot"].shape == (6, HEAD["out_dim"])  # 3 masked patches x 2 images
        assert not torch.allclose(u["cls"], v["cls"], atol=1e-3), name  # unmasked, the pixels matter


# -- KoLeo, Gram ---------------------------------------------------------------------------------
def test_koleo_matches_formula_and_fails_clearly_on_tiny_batches():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    xn = F.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.eye(6) * 10
    want = -torch.log(d.min(dim=1).values + 1e-8).mean()
    assert torch.allclose(KoLeoLoss()(x), want, atol=1e-5)
    # the distributed form: rows 2..3 searched in the whole batch == those rows' terms
    part = KoLeoLoss()(x[2:4], all_x=x, offset=2)
    assert torch.allclose(part, -torch.log(d.min(dim=1).values[2:4] + 1e-8).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        KoLeoLoss()(torch.randn(1, 5))


def test_gram_loss_matches_formula():
    torch.manual_seed(0)
    s, a = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    sn, an = F.normalize(s, dim=-1), F.normalize(a, dim=-1)
    want = ((sn @ sn.transpose(1, 2) - an @ an.transpose(1, 2)) ** 2).mean()
    assert torch.allclose(GramLoss()(s, a), want, atol=1e-6)
    assert float(GramLoss()(s, s)) == pytest.approx(0.0, abs=1e-10)


# -- masking -------------------------------------------------------------------------------------
def test_block_masks_have_the_asked_count_and_are_reproducible():
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 5, 12, 24, 49):
        m = block_mask(7, n, g)
        assert m.shape == (7, 7) and int(m.sum()) == n
    a = batch_masks(10, 7, 0.5, (0.1, 0.5), torch.Generator().manual_seed(1))
    b = batch_masks(10, 7, 0.5, (0.1, 0.5), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    counts = a.sum(1)
    assert int((counts > 0).sum()) == 5
    assert all(round(0.1 * 49) <= int(c) <= round(0.5 * 49) for c in counts if c > 0)
    with pytest.raises(ValueError, match="mask_ratio"):
        batch_masks(4, 7, 0.5, (0.6, 0.2), g)


# -- crops ---------------------------------------------------------------------------------------
def test_multicrop_shapes_normalisation_and_shard_consistency():
    cfg = CropConfig(local_number=3, mean=(0.5,), std=(0.5,))
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    c = MultiCrop(cfg)(x, torch.Generator().manual_seed(0))
    assert c.globals.shape == (16, 1, 28, 28) and c.locals.shape == (24, 1, 12, 12)
    assert c.globals.min() >= -1 - 1e-6 and c.globals.max() <= 1 + 1e-6
    # a process holding rows 4..7 of the batch gets exactly those rows of every crop
    half = MultiCrop(cfg)(x[4:], torch.Generator().manual_seed(0), offset=4, global_batch=8)
    assert torch.allclose(half.globals.view(2, 4, 1, 28, 28), c.globals.view(2, 8, 1, 28, 28)[:, 4:], atol=1e-6)
    assert torch.allclose(half.locals.view(3, 4, 1, 12, 12), c.locals.view(3, 8, 1, 12, 12)[:, 4:], atol=1e-6)


def test_identity_crop_reproduces_the_image():
    from training.dinomx.crops import crop_resize

    x = torch.rand(2, 3, 28, 28)
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0]] * 2)
    same = crop_resize(x, boxes, 28, torch.tensor([False, True]))
    assert torch.allclose(same[0], x[0], atol=1e-5)
    assert torch.allclose(same[1], x[1].flip(-1), atol=1e-5)  # mirrored


def test_label_guided_local_crops_contain_the_region():
    g = torch.Generator().manual_seed(0)
    n = 200
    boxes = sample_boxes(n, 28, 28, (0.05, 0.2), g)
    regions = torch.tensor([[15.0, 3.0, 24.0, 9.0]]).repeat(n, 1)
    regions[::4] = float("nan")  # a quarter have no annotation
    use = torch.ones(n, dtype=torch.bool)
    out = guide_boxes(boxes, regions, use, 28, 28, g)
    has = ~torch.isnan(regions).any(1)
    x0, y0, w, h = out[has].unbind(1)
    r = regions[has]
    eps = 1e-4
    assert torch.all(x0 <= r[:, 0] + eps) and torch.all(x0 + w >= r[:, 2] - eps)
    assert torch.all(y0 <= r[:, 1] + eps) and torch.all(y0 + h >= r[:, 3] - eps)
    assert torch.all(x0 >= -eps) and torch.all(x0 + w <= 28 + eps)
    assert torch.equal(out[~has], boxes[~has])  # no region: the crop is unchanged
    unguided = guide_boxes(boxes, regions, torch.zeros(n, dtype=torch.bool), 28, 28, g)
    assert torch.equal(unguided, boxes)


def test_multicrop_label_guided_share():
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    regions = torch.tensor([[2.0, 2.0, 6.0, 6.0]]).repeat(64, 1)

    def covered(share: float) -> float:
        c = MultiCrop(CropConfig(local_number=4, local_scale=(0.05, 0.1), label_guided=share))(
            x, torch.Generator().manual_seed(3), regions=regions)
        b = c.local_boxes.reshape(-1, 4)
        inside = (b[:, 0] <= 2) & (b[:, 1] <= 2) & (b[:, 0] + b[:, 2] >= 6) & (b[:, 1] + b[:, 3] >= 6)
        return float(inside.float().mean())

    assert covered(1.0) == 1.0
    assert covered(0.0) < 0.2
    assert 0.35 < covered(0.5) < 0.75
    with pytest.raises(ValueError, match="label_guided"):
        MultiCrop(CropConfig(label_guided=1.5))


# -- backbones -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit-test", "dinov3-test", "vitreg-test", "hfvit-test"])
def test_named_backbones_give_cls_and_patches_without_registers(name):
    enc = ViTBackbone(create_model(name, in_chans=3), pooling="cls")
    cls, patches = enc.encode(torch.randn(2, 3, 28, 28))
    assert cls.shape == (2, 32) and patches.shape == (2, 49, 32)
    cls12, p12 = enc.encode(torch.randn(2, 3, 12, 12))  # local crops: other resolution, same model
    assert p12.shape == (2, 9, 32)


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="named config"):
        create_model("vit-huge-typo")
    with pytest.raises(BackboneError, match="no config.json"):
        create_model(str(tmp_path))


def test_channel_adaptation_keeps_pretrained_filters(tmp_path):
    torch.manual_seed(0)
    rgb = create_model("vit-test", in_chans=3)
    rgb.save_pretrained(tmp_path / "rgb")
    grey = create_model(str(tmp_path / "rgb"), in_chans=1, channel_init="mean")
    assert grey.config.num_channels == 1
    x = torch.rand(2, 1, 28, 28)
    # a grey image through the adapted 1-channel model == the same image replicated to RGB through the original
    with torch.no_grad():
        a = grey(pixel_values=x).last_hidden_state
        b = rgb(pixel_values=x.repeat(1, 3, 1, 1)).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    four = create_model(str(tmp_path / "rgb"), in_chans=4, channel_init="repeat")
    w_old, w_new = patch_embedding(rgb)[2].weight, patch_embedding(four)[2].weight
    assert torch.allclose(w_new[:, 3], w_old[:, 0] * 3 / 4) and torch.allclose(w_new[:, 1], w_old[:, 1] * 3 / 4)
    four.save_pretrained(tmp_path / "four")  # the new channel count round-trips through the config
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / "four").config.num_channels == 4
    with pytest.raises(BackboneError, match="mean or repeat"):
        adapt_channels(create_model("vit-test"), 2, "zero")


def test_named_configs_are_all_buildable_quickly():
    for name, (_, kw) in NAMED_CONFIGS.items():
        if kw["hidden_size"] > 200:
            continue
        m = create_model(name)
        assert len(blocks(m)) == kw["num_hidden_layers"]


# -- strategies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit-test", "dinov3-test", "hfvit-test"])
def test_lora_targets_found_by_structure_and_train_few_parameters(name):
    enc = ViTBackbone(create_model(name), pooling="cls")
    assert set(attention_linear_names(enc.model)) >= {"q_proj", "v_proj"} or \
        set(attention_linear_names(enc.model)) >= {"query", "value"}
    total = sum(p.numel() for p in enc.parameters())
    apply_lora(enc, r=2, alpha=4)
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert 0 < trainable * 10 <= total
    assert all("lora_" in n for n, p in enc.named_parameters() if p.requires_grad)
    cls, patches = enc.encode(torch.randn(1, 3, 28, 28))  # still runs, masks included
    assert patches.shape == (1, 49, 32)


def test_freeze_first_blocks_and_patch_embedding():
    enc = ViTBackbone(create_model("vit-test"), pooling="cls")
    freeze(enc, first_blocks=1, patch_embed=True)
    layers = blocks(enc.model)
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not patch_embedding(enc.model)[2].weight.requires_grad
    with pytest.raises(ValueError, match="blocks"):
        freeze(enc, first_blocks=5)


def test_param_groups_layer_decay_and_no_weight_decay_on_1d():
    model = SSLModel(ViTBackbone(create_model("vit-test"), pooling="cls"), HEAD_CONFIG)
    groups = param_groups(model, layer_decay=0.5)
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)
    by_layer = {g["layer"]: g["lr_scale"] for g in groups}
    assert by_layer[3] == 1.0 and by_layer[2] == 0.5 and by_layer[1] == 0.25 and by_layer[0] == 0.125
    for g in groups:
        if g["wd_on"]:
            assert all(p.ndim >= 2 for p in g["params"])
    cls_token = model.encoder.model.embeddings.cls_token
    assert any(cls_token is p for g in groups if not g["wd_on"] for p in g["params"])


def test_schedules():
    s = cosine(1.0, 0.0, 100, warmup=10)
    assert len(s) == 100 and s[0] == 0.0 and s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.0, abs=1e-3)
    assert np.all(np.diff(s[10:]) <= 1e-12)
    t = teacher_temperature(0.07, 0.04, 30, 100)
    assert t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07) and t[-1] == 0.07
    m = cosine(0.992, 1.0, 50)
    assert m[0] == pytest.approx(0.992) and m[-1] == pytest.approx(1.0, abs=1e-5)
    assert math.isclose(cosine(2.0, 2.0, 5)[3], 2.0)
