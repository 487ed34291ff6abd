"""Interpretability maps: CLS attention against attention recomputed from the weights (registers skipped),
rollout against a numpy implementation, PCA against numpy's eigendecomposition, exact peak / pointing
coordinates, overlays, CAMs against Zhou et al.'s formula, and ``zoo explain`` end to end."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import install, tiny_overrides
from PIL import Image

from zoo.api import ZooModel, load_backbone
from zoo.backbones import ViTBackbone
from zoo.cli import main as zoo_main
from zoo.data import preprocess
from zoo.explain import explain
from zoo.maps import attention_rollout, cam, cls_attention, colormap, overlay, pca_image, peak, pointing_hit
from zoo.models import create_student
from zoo.registry import get_entry

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=4)  # 7 x 7 patch grid
REGISTERS = {"dinov2": 0, "dinov2_reg": 4, "vit": 0, "dinov3": 4}
CHANNELS = {"dinov2": 3, "dinov2_reg": 3, "vit": 3, "dinov3": 1}  # a grey DINOv3, as dinomx-* grey entries are
VIT_FILES = {"input.png", "attention_head0.png", "attention_head1.png", "attention_mean.png", "rollout.png",
             "pca.png", "maps.npz", "explain.json"}


@pytest.fixture(scope="session")
def tiny_vits(tmp_path_factory) -> dict[str, Path]:
    """Random 2-layer, 2-head, 32-dim ViTs of each family, patch 4 on 28 px, saved with save_pretrained.

    The grey DINOv3 carries a one-value mean/std in preprocessor_config.json, as a grey backbone must.
    """
    import transformers as T

    specs = {
        "dinov2": (T.Dinov2Config(**TINY), T.Dinov2Model),
        "dinov2_reg": (T.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4), T.Dinov2WithRegistersModel),
        "vit": (T.ViTConfig(**TINY), T.ViTModel),
        "dinov3": (T.DINOv3ViTConfig(**TINY, num_register_tokens=4, num_channels=1), T.DINOv3ViTModel),
    }
    dirs = {}
    for i, (kind, (cfg, cls)) in enumerate(specs.items()):
        torch.manual_seed(i)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        cls(cfg).save_pretrained(dirs[kind])
    (dirs["dinov3"] / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5], "image_std": [0.5]}))
    return dirs


def _images(n: int = 2, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Normalised-looking input (n, channels, 28, 28)."""
    return torch.randn(n, channels, 28, 28, generator=torch.Generator().manual_seed(seed))


def _recomputed_attention(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's softmax(q k^T / sqrt(d)), from the q/k projections of each attention module's input.

    Independent of transformers' ``output_attentions`` path: the forward runs without it and the inputs
    of the attention modules are captured by hooks (with the RoPE cos/sin for DINOv3).
    """
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    seen: list[tuple[torch.Tensor, tuple | None]] = []

    def grab(m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings")))

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(pixel_values=x)
    finally:
        for h in handles:
            h.remove()
    probs = []
    for m, (h, rope) in zip(mods, seen):
        b, t, _ = h.shape
        heads = model.config.num_attention_heads
        q = m.q_proj(h).view(b, t, heads, -1).transpose(1, 2)
        k = m.k_proj(h).view(b, t, heads, -1).transpose(1, 2)
        if rope is not None:
            q, k = sys.modules[type(m).__module__].apply_rotary_pos_emb(q, k, *rope)
        probs.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
    assert len(probs) == model.config.num_hidden_layers
    return probs


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("kind", list(REGISTERS))
def test_cls_attention_is_the_cls_row_over_patches_registers_skipped(tiny_vits, kind):
    bb = ViTBackbone.from_pretrained(tiny_vits[kind])
    r = REGISTERS[kind]
    assert bb.num_register_tokens == r
    x = _images(channels=CHANNELS[kind])
    probs = _recomputed_attention(bb.model, x)
    assert probs[0].shape == (2, 2, 1 + r + 49, 1 + r + 49)
    for layer in (0, 1):
        maps = cls_attention(bb, x, layer=layer)
        assert maps.shape == (2, 2, 7, 7)  # g*g = 49 patch tokens, not 1 + r + 49
        want = probs[layer][:, :, 0, 1 + r :].reshape(2, 2, 7, 7)
        torch.testing.assert_close(maps, want, atol=1e-6, rtol=1e-5)
        # Not renormalised: each head's map holds what the CLS query does not spend on CLS and registers.
        skipped = probs[layer][:, :, 0, : 1 + r].sum(dim=-1)
        torch.testing.assert_close(maps.sum(dim=(-2, -1)), 1 - skipped, atol=1e-6, rtol=1e-5)
        if r:
            assert (skipped - probs[layer][:, :, 0, 0]).min() > 1e-4  # the registers do hold attention
    torch.testing.assert_close(cls_attention(bb, x), cls_attention(bb, x, layer=1))


def test_cls_attention_needs_eager_attention_and_an_existing_layer(tiny_vits):
    bb = ViTBackbone.from_pretrained(tiny_vits["dinov2"])
    with pytest.raises(ValueError, match="layer 2 does not exist.*2 layers"):
        cls_attention(bb, _images(), layer=2)
    bb.model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager attention.*'sdpa'"):
        cls_attention(bb, _images())


def _numpy_rollout(attentions: list[np.ndarray], registers: int, fusion: str, ratio: float) -> np.ndarray:
    """Abnar & Zuidema's rollout written out: per image, per layer, fuse, discard, 0.5 A + 0.5 I, renormalise."""
    b, _, t, _ = attentions[0].shape
    out = []
    for i in range(b):
        result = np.eye(t)
        for a in attentions:
            fused = {"mean": a[i].mean(0), "max": a[i].max(0), "min": a[i].min(0)}[fusion]
            flat = fused.flatten()
            drop = np.argsort(flat, kind="stable")[: int(t * t * ratio)]
            flat[drop[drop != 0]] = 0.0
            a_hat = 0.5 * flat.reshape(t, t) + 0.5 * np.eye(t)
            a_hat /= a_hat.sum(axis=-1, keepdims=True)
            result = a_hat @ result
        out.append(result[0, 1 + registers :].reshape(7, 7))
    return np.stack(out)


@pytest.mark.parametrize("fusion, ratio", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.6)])
@pytest.mark.parametrize("kind", ["dinov2", "dinov2_reg"])
def test_rollout_matches_numpy(tiny_vits, kind, fusion, ratio):
    bb = ViTBackbone.from_pretrained(tiny_vits[kind])
    x = _images(3, seed=1)
    with torch.no_grad():
        atts = [a.double().numpy() for a in bb.model(pixel_values=x, output_attentions=True).attentions]
    got = attention_rollout(bb, x, head_fusion=fusion, discard_ratio=ratio)
    assert got.shape == (3, 7, 7)
    np.testing.assert_allclose(got.double().numpy(), _numpy_rollout(atts, REGISTERS[kind], fusion, ratio),
                               rtol=1e-5, atol=1e-7)


def test_rollout_rejects_bad_options(tiny_vits):
    bb = ViTBackbone.from_pretrained(tiny_vits["dinov2"])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(bb, _images(), head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(bb, _images(), discard_ratio=1.0)


@pytest.mark.parametrize("kind", ["dinov2_reg", "dinov3"])
def test_pca_image_is_joint_pca_of_patch_tokens_in_unit_range(tiny_vits, kind):
    bb = ViTBackbone.from_pretrained(tiny_vits[kind])
    x = _images(2, seed=2, channels=CHANNELS[kind])
    img = pca_image(bb, x)
    assert img.shape == (2, 7, 7, 3) and img.min() >= 0 and img.max() <= 1
    # Jointly over the batch: each component spans exactly [0, 1] across both images together.
    comps = img.reshape(-1, 3)
    torch.testing.assert_close(comps.amin(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(comps.amax(0), torch.ones(3), atol=1e-6, rtol=0)
    # Against numpy's eigendecomposition of the covariance of the patch tokens (registers and CLS left out).
    with torch.no_grad():
        tokens = bb.forward_features(x)[:, 1 + REGISTERS[kind] :].double().reshape(-1, 32).numpy()
    centred = tokens - tokens.mean(0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    proj = centred @ vecs[:, ::-1][:, :3]
    want = (proj - proj.min(0)) / (proj.max(0) - proj.min(0))
    got = comps.double().numpy()
    for c in range(3):  # a principal direction's sign is arbitrary: match it or its mirror image
        err = min(np.abs(got[:, c] - want[:, c]).max(), np.abs(got[:, c] - (1 - want[:, c])).max())
        assert err < 1e-5, (c, err)
    assert pca_image(bb, x, n=2).shape == (2, 7, 7, 2)


# ------------------------------------------------------------------------------------ pointing


def test_peak_is_the_centre_of_the_argmax_cell_in_pixels():
    h = np.zeros((7, 7))
    h[2, 5] = 1.0
    assert peak(h, 28) == (10.0, 22.0)  # cell (2, 5) covers rows 8-11, cols 20-23
    assert peak(h, 224) == (80.0, 176.0)
    assert peak(h, (28, 56)) == (10.0, 44.0)  # (H, W): a wide image stretches columns
    assert peak(h) == (2.5, 5.5)  # at map resolution: the argmax pixel's centre
    assert peak(torch.from_numpy(h).float(), 28) == (10.0, 22.0)
    tie = np.zeros((4, 4))
    tie[1, 3] = tie[3, 0] = 2.0
    assert peak(tie, 8) == (3.0, 7.0)  # ties: first in row-major order
    h3 = np.zeros((3, 3))
    h3[0, 2] = 1.0
    assert peak(h3, 28) == pytest.approx((28 / 6, 5 * 28 / 6))  # a grid that does not divide the image


def test_pointing_hit_uses_half_open_boxes():
    h = np.zeros((7, 7))
    h[2, 5] = 1.0  # peak at row 10, col 22 on a 28 px image
    assert pointing_hit(h, (20, 8, 24, 12), 28)
    assert pointing_hit(h, (22, 10, 23, 11), 28)  # x0 = col and y0 = row are inside
    assert not pointing_hit(h, (0, 0, 22, 28), 28)  # x1 = col is outside
    assert not pointing_hit(h, (0, 0, 28, 10), 28)  # y1 = row is outside
    assert pointing_hit(h, (21.99, 9.99, 22.01, 10.01), 28)
    assert pointing_hit(h, (176, 80, 177, 81), 224) and not pointing_hit(h, (0, 0, 176, 224), 224)  # peak (80, 176)
    # Two boxes that share the edge through the peak: exactly one of them is hit.
    assert [pointing_hit(h, b, 28) for b in [(0, 0, 22, 28), (22, 0, 28, 28)]] == [False, True]
    with pytest.raises(ValueError, match="x1 > x0"):
        pointing_hit(h, (5, 5, 5, 9), 28)
    with pytest.raises(ValueError, match="NaN"):
        peak(np.full((2, 2), np.nan), 28)
    with pytest.raises(ValueError, match="2-D"):
        peak(np.zeros((1, 7, 7)), 28)


# ------------------------------------------------------------------------------------ overlay


def test_overlay_upscales_colours_and_blends():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    h = np.zeros((7, 7))
    h[2, 5] = 3.0  # any range: min-max scaled
    out = overlay(grey, h)
    assert out.mode == "RGB" and out.size == (224, 224)
    # alpha 0: the image alone, upscaled x8 with nearest (each pixel an 8 x 8 block).
    plain = np.asarray(overlay(grey, h, alpha=0.0))
    np.testing.assert_array_equal(plain, np.repeat(np.kron(grey, np.ones((8, 8), np.uint8))[..., None], 3, -1))
    # alpha 1: the colormap alone. Bilinear upsampling by 32 (pixel centres aligned, as torch's
    # align_corners=False): the pixels nearest the hot cell's centre sit 1/64 cell off it on both axes.
    heat = np.asarray(overlay(grey, h, alpha=1.0)).astype(int)
    near_top = np.round(colormap((1 - 1 / 64) ** 2) * 255)
    for r, c in [(79, 175), (79, 176), (80, 175), (80, 176)]:
        assert np.abs(heat[r, c] - near_top).max() <= 1
    assert heat[60:100, 150:200, 0].max() == heat[80, 176, 0]  # the yellowest spot is the hot cell
    np.testing.assert_array_equal(heat[200, 20], np.round(colormap(0.0) * 255))  # far cells: viridis' bottom
    half = np.asarray(overlay(grey, h, alpha=0.5)).astype(int)
    assert np.abs(half - (plain + heat) / 2).max() <= 1
    # PIL and RGB inputs, no upscaling for large images, non-square images, constant maps.
    rgb = rng.integers(0, 256, (240, 300, 3), dtype=np.uint8)
    assert overlay(Image.fromarray(rgb), h).size == (300, 240)
    assert overlay(rgb[:28, :56], h).size == (448, 224)
    assert overlay(grey, h, min_size=0).size == (28, 28)
    assert np.isfinite(np.asarray(overlay(grey, np.ones((7, 7))))).all()
    with pytest.raises(ValueError, match="uint8"):
        overlay(grey.astype(np.float32), h)


def test_colormap_is_viridis():
    np.testing.assert_allclose(colormap(np.array([0.0, 0.5, 1.0])) * 255,
                               [[0x44, 0x01, 0x54], [0x21, 0x90, 0x8C], [0xFD, 0xE7, 0x25]], atol=1e-9)
    assert colormap(np.zeros((2, 3))).shape == (2, 3, 3)
    np.testing.assert_allclose(colormap(np.array([-1.0, 2.0])), colormap(np.array([0.0, 1.0])))


# ------------------------------------------------------------------------------------ CAM


def _student(name: str, seed: int = 0) -> ZooModel:
    e = get_entry(name)
    torch.manual_seed(seed)
    return ZooModel(create_student("resnet-test", e.num_outputs, e.in_chans), e).eval()


def _zhou_cam(model: ZooModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, CAMs (B, K, S, S)) from the features entering global pooling, by Zhou et al.'s formula."""
    feats = []
    handle = model.net.global_pool.register_forward_hook(lambda m, args, out: feats.append(args[0]))
    with torch.no_grad():
        logits = model.net(x)
    handle.remove()
    fc = model.net.get_classifier()
    raw = torch.einsum("kf,bfhw->bkhw", fc.weight, feats[0])
    # The hook caught the right tensor: the spatial mean of each map plus the bias is the logit.
    torch.testing.assert_close(raw.mean(dim=(-2, -1)) + fc.bias, logits, atol=1e-5, rtol=1e-5)
    return logits, F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_cam_of_binary_student_follows_the_predicted_class():
    model = _student("baseline-resnet18-breastmnist")
    x = preprocess(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), model.entry.preprocess)
    with torch.no_grad():  # centre the bias so the batch holds both predicted classes
        model.net.get_classifier().bias -= model.net(x)[:, 0].median() - 1e-4
    logits, zhou = _zhou_cam(model, x)
    positive = logits[:, 0] > 0
    assert 0 < positive.sum() < len(x)
    sign = torch.where(positive, 1.0, -1.0).view(-1, 1, 1)
    got = cam(model, x)
    assert got.shape == (6, 28, 28)
    torch.testing.assert_close(got, sign * zhou[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam(model, x, class_index=1), zhou[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam(model, x, class_index=0), -zhou[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="0 or 1"):
        cam(model, x, class_index=2)


def test_cam_of_multiclass_student_is_the_argmax_class_map():
    model = _student("baseline-resnet18-dermamnist")
    x = preprocess(torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8), model.entry.preprocess)
    logits, zhou = _zhou_cam(model, x)
    pred = logits.argmax(1)
    torch.testing.assert_close(cam(model, x), zhou[torch.arange(4), pred], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam(model, x, class_index=3), zhou[:, 3], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"0\.\.6"):
        cam(model, x, class_index=7)


# ------------------------------------------------------------------------------------ zoo explain


def _scan(path: Path, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    img[4:12, 16:24] = 255  # a bright block
    Image.fromarray(img).save(path)
    return img


@pytest.mark.parametrize("kind", ["dinov2_reg", "dinov3"])
def test_zoo_explain_writes_maps_for_a_transformers_dir(tiny_vits, tmp_path, monkeypatch, capsys, kind):
    img = _scan(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    assert zoo_main(["explain", str(tiny_vits[kind]), "scan.png"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    out = tmp_path / f"explain-{tiny_vits[kind].name}-scan"
    assert line.startswith(f"explained {tiny_vits[kind]} on scan.png (layer 1, 2 heads)") and str(out.name) in line
    assert {p.name for p in out.iterdir()} == VIT_FILES
    s = json.loads((out / "explain.json").read_text())
    assert s["kind"] == "vit" and s["grid"] == [7, 7] and s["register_tokens"] == 4 and s["heads"] == 2
    assert s["image_size"] == [28, 28] and s["display_size"] == [224, 224]
    assert set(s["files"].values()) == VIT_FILES

    # The files hold the library's maps for the preprocessed image.
    bb, prep = load_backbone(tiny_vits[kind])
    x = preprocess(torch.from_numpy(img)[None, None], prep)
    assert x.shape == (1, CHANNELS[kind], 28, 28)
    maps = np.load(out / "maps.npz")
    np.testing.assert_allclose(maps["attention"], cls_attention(bb, x)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(maps["attention_mean"], cls_attention(bb, x)[0].mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(maps["rollout"], attention_rollout(bb, x)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(maps["pca"], pca_image(bb, x)[0].numpy(), atol=1e-5)
    for key in ("attention_head0", "attention_head1", "attention_mean", "rollout"):
        h = maps["attention"][int(key[-1])] if key.startswith("attention_head") else maps[key]
        assert s["peaks"][key] == list(peak(h, 28))
        assert Image.open(out / f"{key}.png").size == (224, 224)
    big = np.kron(img, np.ones((8, 8), np.uint8))  # nearest x8; grey replicated to RGB when the model takes RGB
    want = big if CHANNELS[kind] == 1 else np.repeat(big[..., None], 3, -1)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "input.png")), want)
    assert Image.open(out / "pca.png").mode == "RGB"

    # --layer and --out; a rerun into the same folder replaces the set.
    assert zoo_main(["explain", str(tiny_vits[kind]), "scan.png", "--layer", "0", "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out / "maps.npz")["attention"], cls_attention(bb, x, layer=0)[0].numpy(),
                               atol=1e-6)
    assert json.loads((out / "explain.json").read_text())["layer"] == 0


def test_explain_reads_npy_pil_and_arrays_alike(tiny_vits, tmp_path):
    img = _scan(tmp_path / "scan.png", seed=3)
    np.save(tmp_path / "scan.npy", img)
    runs = {"png": tmp_path / "scan.png", "npy": tmp_path / "scan.npy", "pil": Image.fromarray(img),
            "array": np.repeat(img[..., None], 3, -1)}  # RGB copy of the grey image: the model sees the same
    got = {}
    for k, image in runs.items():
        files = explain(tiny_vits["dinov2"], image, tmp_path / k)
        got[k] = np.load(files["maps"])["rollout"]
        assert files["summary"].name == "explain.json" and all(p.is_file() for p in files.values())
    for k in runs:
        np.testing.assert_allclose(got[k], got["png"], atol=1e-6)
    assert json.loads((tmp_path / "pil" / "explain.json").read_text())["image"] == "<Image>"


def test_explain_linear_entry_by_name(built_linear_breast, tmp_path):
    install(built_linear_breast)
    _scan(tmp_path / "scan.png")
    files = explain("linear-dinov2-vits14-breastmnist", tmp_path / "scan.png", tmp_path / "out")
    s = json.loads(files["summary"].read_text())
    # the conftest teacher has patch 7; linear-* entries see the image at DINOv2's 224 px: a 32 x 32 grid
    assert s["kind"] == "vit" and s["grid"] == [32, 32]
    assert np.load(files["maps"])["attention"].shape == (2, 32, 32)


def test_zoo_explain_cam_for_a_cnn_run(tmp_path, capsys):
    from training.entries import train_config

    run = train_config("medalmighty/default.yaml",
                       tiny_overrides("baseline", "breastmnist", tmp_path / "runs", "train.epochs=1"), progress=False)
    img = _scan(tmp_path / "scan.png")
    out = tmp_path / "cam"
    assert zoo_main(["explain", str(run), str(tmp_path / "scan.png"), "--out", str(out)]) == 0
    assert "cam peak at" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"input.png", "cam.png", "maps.npz", "explain.json"}
    s = json.loads((out / "explain.json").read_text())
    import zoo

    model = zoo.load(run)
    x = preprocess(torch.from_numpy(img)[None, None], model.entry.preprocess)
    want = cam(model, x)[0].numpy()
    np.testing.assert_allclose(np.load(out / "maps.npz")["cam"], want, atol=1e-5)
    assert s["kind"] == "cnn" and s["grid"] == [28, 28] and s["peaks"]["cam"] == list(peak(want, 28))
    assert s["label"] == model.entry.labels[s["class_index"]]
    assert Image.open(out / "cam.png").size == (224, 224)


def test_zoo_explain_errors_say_what_to_do(tiny_vits, tmp_path, capsys):
    from transformers import ResNetConfig

    _scan(tmp_path / "scan.png")
    (tmp_path / "notes.png").write_text("not an image")
    ResNetConfig(hidden_sizes=[8], depths=[1]).save_pretrained(tmp_path / "resnet")
    vit = str(tiny_vits["dinov2"])
    # exit status 2: the command was wrong (a name, an argument); 1: what it points at is not usable
    cases = [
        ([vit, str(tmp_path / "notes.png")], "cannot read .*notes.png as an image.*PNG or JPEG", 1),
        ([vit, str(tmp_path / "missing.png")], "image .*missing.png not found", 1),
        (["dinomx-vitz-nosuchmnist", str(tmp_path / "scan.png")], "unknown zoo model", 2),
        ([str(tmp_path / "nowhere"), str(tmp_path / "scan.png")], "model folder .*nowhere not found", 1),
        ([str(tmp_path), str(tmp_path / "scan.png")], "has no config.json", 1),
        ([str(tmp_path / "resnet"), str(tmp_path / "scan.png")], "no patch grid.*ViT", 1),
        (["baseline-resnet18-breastmnist", str(tmp_path / "scan.png")], "zoo build baseline-resnet18-breastmnist", 1),
        ([vit, str(tmp_path / "scan.png"), "--layer", "5"], "layer 5 does not exist", 2),
    ]
    for args, msg, status in cases:
        assert zoo_main(["explain", *args, "--out", str(tmp_path / "o")]) == status, args
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any transformers loading bars
        assert err.startswith("zoo: error: ")
        assert re.search(msg, err), (args, err)
    assert not (tmp_path / "o" / "explain.json").exists()


def test_explain_cli_imports_cheaply():
    """``zoo.cli`` imports the module to build its parser: only the standard library at module level."""
    src = Path(__file__).resolve().parents[2] / "zoo" / "explain_cli.py"
    top = [n for n in ast.parse(src.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "argparse", "pathlib"}, names
