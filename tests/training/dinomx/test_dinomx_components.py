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


@pytest.mark.parametrize("s_crops,t_crops", [(8, 2), (2, 2), (1, 2), (3, 1)])
def test_dino_loss_regrouped_sum_equals_the_pair_loop_in_value_and_gradient(s_crops, t_crops):
    """The loss sums over student crops against summed teacher targets: the pair loop's value and gradient."""
    torch.manual_seed(s_crops * 10 + t_crops)
    loss = DINOLoss(16, student_temp=0.1)
    student = torch.randn(s_crops, 3, 16, requires_grad=True)
    teacher = torch.randn(t_crops, 3, 16)
    probs = loss.teacher_probs(teacher, 0.04)
    got = loss(student, probs)
    (g_got,) = torch.autograd.grad(got, student)
    s2 = student.detach().clone().requires_grad_(True)
    want = _dino_reference(s2, teacher, torch.zeros(1, 16), 0.1, 0.04)
    (g_want,) = torch.autograd.grad(want, s2)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(g_got, g_want, atol=1e-7)


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


# -- fixed bugs (issue: DINO-MX that learns on a small budget) -----------------------------------
def test_sinkhorn_knopp_on_an_empty_input():
    """A process (or a step) without masked crops hands iBOT's Sinkhorn-Knopp no rows: (0, K) back, no crash."""
    q = sinkhorn_knopp(torch.zeros(0, 8), temp=0.1)
    assert q.shape == (0, 8)
    loss = IBOTPatchLoss(8, centering="sinkhorn")
    assert loss.teacher_probs(torch.zeros(0, 8), 0.07).shape == (0, 8)


def test_koleo_term_sums_the_two_global_crops_as_dinov2_does():
    """DINOv2's ssl_meta_arch: ``koleo_loss_weight * sum(self.koleo_loss(p) for p in student_cls_tokens.chunk(2))``."""
    from types import SimpleNamespace

    from training import distributed as D
    from training.dinomx.task import _koleo

    torch.manual_seed(0)
    cls = torch.randn(2 * 6, 5)
    env = D.DistEnv("none", 0, 1, 0, torch.device("cpu"))
    task = SimpleNamespace(koleo=KoLeoLoss(), env=env, offset=0)
    ctx = SimpleNamespace(student={"cls": cls}, b=6)  # what the KoLeo term reads of a step's tensors
    want = sum(KoLeoLoss()(p) for p in cls.chunk(2))  # DINOv2's formula
    assert torch.allclose(_koleo(task, ctx), want, atol=1e-6)


def test_label_guided_share_does_not_change_the_other_random_draws():
    """Two runs that differ only in crops.label_guided are paired: same globals, same unguided locals."""
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    regions = torch.tensor([[3.0, 4.0, 9.0, 11.0]]).repeat(16, 1)

    def crops(share: float, with_regions: bool = True):
        cfg = CropConfig(local_number=4, local_scale=(0.05, 0.2), label_guided=share)
        return MultiCrop(cfg)(x, torch.Generator().manual_seed(5), regions=regions if with_regions else None)

    base, guided, full = crops(0.0), crops(0.5), crops(1.0)
    assert torch.equal(base.globals, guided.globals) and torch.equal(base.global_boxes, guided.global_boxes)
    # A crop the 0.5 run did not guide is the 0 run's crop, pixel for pixel (and its photometric draws too).
    unguided = (guided.local_boxes == base.local_boxes).all(dim=-1)  # (n_local, b)
    assert 0 < int(unguided.sum()) < unguided.numel()
    lb, lg = base.locals.view(4, 16, 1, 12, 12), guided.locals.view(4, 16, 1, 12, 12)
    assert torch.equal(lb[unguided], lg[unguided])
    # The guided crops are the fully guided run's crops: placement draws do not depend on the share either.
    assert torch.equal(guided.local_boxes[~unguided], full.local_boxes[~unguided])
    # Without regions the stream is the same as with regions and nothing guided.
    assert torch.equal(crops(0.5, with_regions=False).locals, base.locals)


def test_drop_path_draws_differ_per_process_and_repeat_on_resume(tmp_path):
    """Each process draws its own stochastic depth (its own images), and the same again for the same step."""
    from training import distributed as D
    from training.config import load_config
    from training.dinomx.data import PretrainData
    from training.dinomx.task import DinoTask

    cfg = load_config("dinomx/dino.yaml", ["model.backbone=vit-test", "model.drop_path=0.5", "head.out_dim=64",
                                           "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.batch_size=8",
                                           "optim.steps=4", "crops.local_number=2", "optim.amp=none"])
    from training.dinomx.config import parse
    from training.dinomx.model import param_groups

    images = PretrainData(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8))
    states = {}
    for rank in (0, 1):
        # Process `rank` of 2, simulated in this process: the plain runner, no process group (KoLeo is off).
        env = D.DistEnv("none", rank, 2, rank, torch.device("cpu"))
        task = DinoTask(parse(cfg), images, env)
        task.attach(D.wrap(env, task.student, lambda g: torch.optim.AdamW(g), param_groups, cfg))
        seen: list[torch.Tensor] = []
        task.student.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(torch.random.get_rng_state()))
        task.forward(2)
        task.forward(2)  # the same step again (a resumed run)
        assert torch.equal(seen[0], seen[1])
        states[rank] = seen[0]
    assert not torch.equal(states[0], states[1])


# -- collapse monitor ----------------------------------------------------------------------------
def test_monitor_figures_match_their_formulas():
    from training.dinomx.monitor import step_figures

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 5, 8), dim=-1)
    s = torch.randn(10, 8)
    z = torch.randn(10, 4)
    f = step_figures(p, s, 0.1, z, z)
    flat = p.reshape(-1, 8)
    assert float(f["teacher_entropy"]) == pytest.approx(float(-(flat * flat.log()).sum(-1).mean()), abs=1e-5)
    m = flat.mean(0)
    assert float(f["eff_prototypes"]) == pytest.approx(math.exp(float(-(m * m.log()).sum())), rel=1e-5)
    sp = torch.softmax(s / 0.1, -1)
    assert float(f["student_entropy"]) == pytest.approx(float(-(sp * sp.clamp_min(1e-30).log()).sum(-1).mean()),
                                                        abs=1e-4)
    zn = F.normalize(z.view(2, 5, 4), dim=-1)
    cos = [(zn[i] @ zn[i].t())[~torch.eye(5, dtype=torch.bool)].mean() for i in range(2)]
    assert float(f["bottleneck_cos"]) == pytest.approx(float(sum(cos) / 2), abs=1e-5)
    same = step_figures(None, None, 0.1, None, torch.ones(10, 4))
    assert float(same["cls_cos"]) == pytest.approx(1.0, abs=1e-5) and set(same) == {"cls_cos"}
    uniform = step_figures(torch.full((2, 5, 8), 1 / 8), None, 0.1, None, None)
    assert float(uniform["teacher_entropy"]) == pytest.approx(math.log(8), abs=1e-5)
    assert float(uniform["eff_prototypes"]) == pytest.approx(8, rel=1e-5)


def test_monitor_warns_once_after_the_burn_in_and_sums_up():
    from training.dinomx.monitor import PERSIST, CollapseMonitor

    ln_k = math.log(64)
    mon = CollapseMonitor(64, burn_in=20, total=100)
    flat = [{"step": s, "dino": ln_k - 0.01, "cls_cos": 0.5, "eff_prototypes": 60.0} for s in range(10, 101, 10)]
    warnings_ = [mon.observe(r) for r in flat]
    said = [w for w in warnings_ if w]
    assert len(said) == 1 and "ln K" in said[0] and "optim.lr_scaling=linear" in said[0]
    assert mon.warned_at == 20 + 10 * (PERSIST - 1)  # rows before the burn-in are not judged
    s = mon.summary(flat)
    assert s["collapsed"] and s["reasons"] == ["uniform"] and s["advice"] and s["dino_below_ln_k"] < 0.05

    alive = CollapseMonitor(64, burn_in=20, total=100)
    rows = [{"step": s, "dino": 2.0, "cls_cos": 0.3, "eff_prototypes": 30.0} for s in range(10, 101, 10)]
    assert not any(alive.observe(r) for r in rows)
    s = alive.summary(rows)
    assert not s["collapsed"] and s["verdict"].startswith("alive")
    assert s["dino_below_ln_k"] == pytest.approx(ln_k - 2, abs=1e-3)
    same = CollapseMonitor(64, burn_in=0, total=30)
    rows = [{"step": s, "dino": 1.0, "cls_cos": 0.995, "eff_prototypes": 1.0} for s in (10, 20, 30)]
    assert [bool(same.observe(r)) for r in rows] == [False, False, True]
    assert same.summary(rows)["reasons"] == ["features", "dominant"]


# -- fused training forward ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit-test", "vitreg-test"])
def test_fused_forward_equals_the_transformers_forward(name):
    """Same tokens and gradients as ViTBackbone.encode, masks and another resolution included; the CLS-only
    last block gives the same CLS."""
    from training.dinomx import fused

    torch.manual_seed(0)
    enc = ViTBackbone(create_model(name, in_chans=1, drop_path=0.0), pooling="cls")
    assert fused.supported(enc)
    x = torch.randn(3, 1, 28, 28)
    masks = torch.zeros(3, 49, dtype=torch.bool)
    masks[0, [1, 5, 9]] = True
    for inp, m in ((x, None), (x, masks), (torch.randn(3, 1, 12, 12), None)):
        want_cls, want_p = enc.encode(inp, m)
        got_cls, got_p = fused.encode(enc, inp, m)
        torch.testing.assert_close(got_cls, want_cls, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=1e-5)
        only_cls, none = fused.encode(enc, inp, m, patches=False)
        assert none is None
        torch.testing.assert_close(only_cls, want_cls, atol=1e-5, rtol=1e-5)
    g_want = torch.autograd.grad(enc.encode(x)[0].square().sum(), list(enc.parameters()), allow_unused=True)
    g_got = torch.autograd.grad(fused.encode(enc, x, patches=False)[0].square().sum(), list(enc.parameters()),
                                allow_unused=True)
    for (n, _), a, b in zip(enc.named_parameters(), g_got, g_want):
        if b is None:
            assert a is None or not a.any(), n
        else:
            torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()) + 1e-6, rtol=1e-4, msg=n)


def test_fused_bf16_stream_stays_in_bf16_and_near_the_autocast_forward():
    """optim.low_precision_stream: the residual stream and the output in bf16, within bf16 rounding of the
    autocast forward, gradients in float32 on the float32 parameters; off, autocast's float32 stream."""
    from training.dinomx import fused

    torch.manual_seed(0)
    enc = ViTBackbone(create_model("vit-test", in_chans=1, drop_path=0.0), pooling="cls")
    x = torch.randn(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_cls, ref_p = fused.encode(enc, x)
        cls, p = fused.encode(enc, x, dtype=torch.bfloat16)
        only_cls, _ = fused.encode(enc, x, patches=False, dtype=torch.bfloat16)
    assert ref_cls.dtype == torch.float32 and cls.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    want = enc.encode(x)[0]
    scale = float(want.abs().max())
    for got in (cls, only_cls, ref_cls):
        assert float((got.float() - want).abs().max()) < 0.05 * scale
    torch.testing.assert_close(p.float(), ref_p.float(), atol=0.05 * float(ref_p.abs().max()), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused.encode(enc, x, patches=False, dtype=torch.bfloat16)[0].float().square().sum()
    grads = torch.autograd.grad(loss, list(enc.parameters()), allow_unused=True)
    assert all(g is None or g.dtype == torch.float32 for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_fused_forward_draws_stochastic_depth_as_the_transformers_forward():
    from training.dinomx import fused

    enc = ViTBackbone(create_model("vit-test", in_chans=1, drop_path=0.5), pooling="cls").train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(3)
    want = enc.encode(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(fused.encode(enc, x)[0], want, atol=1e-5, rtol=1e-5)


def test_fused_forward_is_not_used_where_it_does_not_apply():
    from training.dinomx import fused

    assert not fused.supported(ViTBackbone(create_model("hfvit-test"), pooling="cls"))
    assert not fused.supported(ViTBackbone(create_model("dinov3-test"), pooling="cls"))
    lora = ViTBackbone(create_model("vit-test"), pooling="cls")
    apply_lora(lora, r=2, alpha=4)
    assert not fused.supported(lora)
