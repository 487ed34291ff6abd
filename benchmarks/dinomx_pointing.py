"""Label-guided crops (DINO-LG) on a synthetic localisation task, measured as a paired experiment.

Data: synthetic grey images (``--size`` px, default 28) of tissue-like texture (smooth noise at two
scales, a random brightness gradient) with distractors (2-4 small sharp dots and, in 70% of images,
a thin vessel-like curve, all bright or dark with the same contrast range as the lesion) and one
lesion-like object per image: an irregular ellipse (random size, orientation and position, a wobbly
boundary, soft edge, speckled inside), bright or dark. Its box (x0, y0, x1, y1, half-open pixels) is
the bounding box of the object's half-intensity mask. Training, validation and test images are
drawn with different seeds.

Design, per seed (``--seeds``, 10 by default):

1. A random-init ViT (``--width/--depth/--heads/--patch``, saved as a transformers directory) is
   evaluated as it is (the *random init* reference).
2. One **shared unguided warm-up**: the first ``--warmup-steps`` of a ``--steps``-step DINO-MX run
   (``--preset``) without label-guided crops, checkpointed.
3. Two **arms branch from that checkpoint** (:meth:`training.dinomx.recipe.Pretraining.branch`:
   student, teacher, heads, optimizer state, centers and schedule position are the warm-up's) and
   train to ``--steps``: ``crops.label_guided=0`` and ``crops.label_guided=--guided``. Their random
   draws are the same (:mod:`training.dinomx.crops` draws every number whatever the share is), so
   the arms see the same batches, global crops and unguided local crops: the only difference is that
   a share of local crops is placed over the lesion.
4. **Gate**: each run's collapse monitor (:mod:`training.dinomx.monitor`) must say the objective is
   alive at the end (warm-up and both arms); otherwise the seed reports *no conclusion*, not a number.

Metrics on the held-out test images, from the saved model (the EMA teacher's backbone), last layer's
CLS -> patch attention (``zoo.maps.cls_attention``):

- **pointing (mean map)**: the head-averaged map's peak cell centre lies in the box (the pointing
  game, ``zoo.maps.pointing_hit``);
- **pointing (best head)**: the same for the single head with the best pointing on the *validation*
  images (chosen there, reported on test);
- **box IoU**: the head-averaged map upsampled to the image, min-max normalised, thresholded at 0.5
  around its peak (``zoo.maps.top_box``), IoU of that box with the lesion's box.

References: chance (mean box area / image area, and the share of patch-cell centres inside the box,
the exact hit rate of a uniformly random peak), the random init, and a contrast baseline that
points at the cell whose pixels differ most from the image median (how salient the lesion is without
any learning). The effect is the per-seed paired difference (with - without) over the live seeds:
mean, a 95% t interval and a 95% bootstrap interval (percentile, 10,000 resamples).

    python -m benchmarks.dinomx_pointing                      # 10 seeds x (warm-up + 2 arms)
    python -m benchmarks.dinomx_pointing --seeds 0 1 2 --steps 200 --warmup-steps 100

Writes ``benchmarks/results/dinomx_pointing.{json,md}``. Whatever the difference is, it is reported as measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.host import host
from zoo import store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dinomx_pointing"


# ------------------------------------------------------------------------------------------ data


def _blob(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))


def synthetic(n: int, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, size, size) uint8 with one lesion each, and its boxes (n, 4) x0, y0, x1, y1 float32.

    Lengths are set at 28 px and scaled with ``size``; see the module docstring for the content.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    s = size / 28
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    images = np.empty((n, 1, size, size), np.uint8)
    boxes = np.empty((n, 4), np.float32)
    for i in range(n):
        bg = 5.0 * gaussian_filter(rng.normal(size=(size, size)), 2.5 * s)
        bg += gaussian_filter(rng.normal(size=(size, size)), 0.8 * s)
        bg = (bg - bg.mean()) / (bg.std() + 1e-6) * 14
        gx, gy = rng.normal(0, 0.6 / s, 2)
        img = 110 + rng.normal(0, 10) + bg + gx * (xx - size / 2) + gy * (yy - size / 2)
        # Distractors as contrasted as the lesion, so attention is not drawn by intensity alone.
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(1, size - 1, 2)
            img += rng.choice([-1, 1]) * rng.uniform(40, 70) * _blob(xx, yy, cx, cy, rng.uniform(0.8, 1.6) * s)
        if rng.random() < 0.7:
            x0, y0 = rng.uniform(0, size, 2)
            th, bend = rng.uniform(0, np.pi), rng.uniform(-0.08, 0.08) / s
            u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
            v = -(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)
            dist = np.abs(v - bend * u**2)
            img += rng.choice([-1, 1]) * rng.uniform(30, 55) * np.exp(-(dist**2) / (2 * (0.6 * s) ** 2))
        # The lesion: an irregular ellipse (two boundary harmonics), soft edge, speckled inside.
        a, b = rng.uniform(2.5, 5.5, 2) * s
        th = rng.uniform(0, np.pi)
        margin = 1.5 * s + max(a, b)
        cx, cy = rng.uniform(margin, size - margin, 2)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        ang = np.arctan2(v, u)
        k = int(rng.integers(2, 5))
        wobble = (1 + 0.18 * np.sin(k * ang + rng.uniform(0, 2 * np.pi))
                  + 0.08 * np.sin((k + 2) * ang + rng.uniform(0, 2 * np.pi)))
        radius = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
        mask = 1 / (1 + np.exp((radius - 1) / 0.12))
        speckle = gaussian_filter(rng.normal(size=(size, size)), 0.7 * s)
        img += mask * (rng.choice([-1, 1]) * rng.uniform(40, 70) + 12 * speckle / (speckle.std() + 1e-6))
        ys, xs = np.nonzero(mask > 0.5)
        boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        images[i, 0] = np.clip(img, 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(boxes)


# ------------------------------------------------------------------------------------------ models


def random_backbone(path: Path, size: int, width: int, depth: int, heads: int, patch: int, seed: int) -> Path:
    """A random-init 1-channel Dinov2 saved as a transformers directory (the start of every run of a seed)."""
    from transformers import Dinov2Config, Dinov2Model

    from zoo.backbones import save_backbone

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
                       patch_size=patch, image_size=size, num_channels=1)
    model = Dinov2Model(cfg)
    return save_backbone(model, path, mean=(0.5,), std=(0.5,), image_size=size)


def run_config(init: Path, guided: float, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """The resolved DINO-MX config of one run; the arms differ only in ``crops.label_guided``."""
    from training.config import load_config

    local = max(a.patch, round(12 * a.size / 28 / a.patch) * a.patch)  # 12 px at 28 px, a whole number of patches
    head = [f"head.out_dim={a.out_dim}"] * (a.out_dim is not None) + [f"head.hidden_dim={a.hidden_dim}"] * (
        a.hidden_dim is not None)
    return load_config(f"dinomx/{a.preset}.yaml", [
        f"model.backbone={init}", f"seed={seed}", f"optim.steps={a.steps}", f"optim.batch_size={a.batch}",
        f"crops.global_size={a.size}", f"crops.local_size={local}", f"crops.label_guided={guided}", *head,
        "checkpoint.every=0", "checkpoint.resume=false", "log.progress=false", f"log.every={max(1, a.steps // 20)}",
        *a.overrides])


def live(pt) -> dict[str, Any]:
    """The gate: the run's collapse-monitor verdict (``alive`` is what a run must be to count)."""
    c = pt.collapse()
    return {"alive": not c["collapsed"], "verdict": c["verdict"], "final": c["final"], "ln_k": c["ln_k"]}


def run_seed(seed: int, data, val, test, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Random init, shared warm-up, and the two arms of one seed (see the module doc)."""
    from training.dinomx.recipe import Pretraining
    from zoo.backbones import ViTBackbone

    init = random_backbone(work / f"init-seed{seed}", a.size, a.width, a.depth, a.heads, a.patch, seed)
    prep = None
    row: dict[str, Any] = {"seed": seed}
    bb = ViTBackbone.from_pretrained(init, "cls")
    row["random_init"] = localisation(bb, _prep(init), val, test, a.size)
    t0 = time.perf_counter()
    warm = Pretraining(run_config(init, 0.0, seed, a), data)
    warm.fit(None, progress=False, stop_after=a.warmup_steps)
    ckpt = work / f"warmup-seed{seed}"
    warm.save_checkpoint(ckpt)
    prep = warm.task.prep
    row["warmup"] = {**localisation(warm.task.saved_model().encoder, prep, val, test, a.size), **live(warm),
                     "steps": a.warmup_steps, "train_seconds": round(time.perf_counter() - t0, 1)}
    del warm
    for name, share in (("without", 0.0), ("with", a.guided)):
        t0 = time.perf_counter()
        pt = Pretraining(run_config(init, share, seed, a), data)
        pt.branch(ckpt / "last.pt", {"crops.label_guided": 0.0})
        pt.fit(None, progress=False)
        row[name] = {**localisation(pt.task.saved_model().encoder, prep, val, test, a.size), **live(pt),
                     "train_seconds": round(time.perf_counter() - t0, 1)}
        del pt
    row["alive"] = all(row[k]["alive"] for k in ("warmup", "without", "with"))
    w, g = row["without"].pop("hits"), row["with"].pop("hits")
    for k in ("random_init", "warmup"):
        row[k].pop("hits")
    row["only_with"], row["only_without"] = int((g & ~w).sum()), int((w & ~g).sum())
    row["difference"] = {m: round(row["with"][m] - row["without"][m], 4) for m in METRICS} if row["alive"] else None
    return row


def _prep(backbone_dir: Path):
    from zoo.api import load_backbone

    return load_backbone(backbone_dir)[1]


# ------------------------------------------------------------------------------------------ metrics

METRICS = ("pointing", "pointing_best_head", "box_iou")


@torch.no_grad()
def head_maps(bb, prep, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Last-layer CLS -> patch attention per head (N, heads, g, g), in the backbone's preprocessing."""
    from zoo.data import preprocess
    from zoo.maps import cls_attention

    bb.eval()
    return torch.cat([cls_attention(bb, preprocess(images[i:i + chunk], prep), layer=-1).float()
                      for i in range(0, len(images), chunk)])


def hits(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> np.ndarray:
    """(N,) bool: does each map's peak fall in its box (the pointing game)."""
    from zoo.maps import pointing_hit

    return np.array([pointing_hit(m, b.tolist(), size) for m, b in zip(maps, boxes)], dtype=bool)


def box_iou(maps: torch.Tensor, boxes: torch.Tensor, size: int, threshold: float = 0.5) -> np.ndarray:
    """(N,) IoU of the box thresholded from each map (upsampled, min-max normalised) with the true box."""
    from zoo.maps import normalise, to_input_size, top_box

    out = np.empty(len(maps))
    for i, (m, b) in enumerate(zip(maps, boxes)):
        p = top_box(normalise(to_input_size(m.numpy(), size)), threshold)
        x0, y0, x1, y1 = (float(v) for v in b)
        iw = max(0.0, min(p.x1, x1) - max(p.x0, x0))
        ih = max(0.0, min(p.y1, y1) - max(p.y0, y0))
        inter = iw * ih
        union = (p.x1 - p.x0) * (p.y1 - p.y0) + (x1 - x0) * (y1 - y0) - inter
        out[i] = inter / union if union > 0 else 0.0
    return out


def localisation(bb, prep, val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 size: int) -> dict[str, Any]:
    """The three metrics of one backbone (the best head chosen on ``val``, every figure on ``test``)."""
    per_val = head_maps(bb, prep, val[0])
    per_test = head_maps(bb, prep, test[0])
    head_scores = [float(hits(per_val[:, h], val[1], size).mean()) for h in range(per_val.shape[1])]
    best = int(np.argmax(head_scores))
    mean = per_test.mean(dim=1)
    h = hits(mean, test[1], size)
    return {"pointing": round(float(h.mean()), 4),
            "pointing_best_head": round(float(hits(per_test[:, best], test[1], size).mean()), 4),
            "best_head": best, "val_pointing_per_head": [round(v, 4) for v in head_scores],
            "box_iou": round(float(box_iou(mean, test[1], size).mean()), 4), "hits": h}


def contrast_maps(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, g, g) mean |pixel - image median| per patch cell: a no-learning saliency reference."""
    x = images.float()[:, 0]
    dev = (x - x.flatten(1).median(dim=1).values[:, None, None]).abs()
    return torch.nn.functional.adaptive_avg_pool2d(dev[:, None], grid)[:, 0]


def chance(boxes: torch.Tensor, size: int, grid: int) -> dict[str, float]:
    """Mean box area / image area, and the mean share of patch-cell centres inside the box."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / size**2
    c = (torch.arange(grid) + 0.5) * size / grid
    inx = (c[None] >= boxes[:, 0:1]) & (c[None] < boxes[:, 2:3])  # (N, g) columns
    iny = (c[None] >= boxes[:, 1:2]) & (c[None] < boxes[:, 3:4])  # (N, g) rows
    cells = (iny.sum(1) * inx.sum(1)).float() / grid**2
    return {"box_area_share": round(float(area.mean()), 4), "cell_centre_share": round(float(cells.mean()), 4)}


def paired(d: list[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-seed paired differences with a t interval and a percentile bootstrap interval."""
    from scipy import stats

    n = len(d)
    if n == 0:
        return {"n": 0}
    x = np.asarray(d, dtype=np.float64)
    out: dict[str, Any] = {"n": n, "mean": round(float(x.mean()), 4), "positive": int((x > 0).sum()),
                           "negative": int((x < 0).sum()), "zero": int((x == 0).sum())}
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    boots = np.random.default_rng(seed).choice(x, size=(resamples, n), replace=True).mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    p = float(stats.ttest_1samp(x, 0.0).pvalue) if sd > 0 else (1.0 if x.mean() == 0 else 0.0)
    out.update(std=round(sd, 4), t_ci=[round(x.mean() - half, 4), round(x.mean() + half, 4)],
               bootstrap_ci=[round(float(lo), 4), round(float(hi), 4)], t_test_p=round(p, 4), level=level)
    return out


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


def conclusion(effects: dict[str, dict[str, Any]], n_seeds: int, guided: float) -> str:
    """One or two sentences on what the live seeds show (or that there is no conclusion)."""
    e = effects["pointing"]
    n = e.get("n", 0)
    if n < 2:
        return (f"No conclusion: {n} of {n_seeds} seeds had a live objective in the warm-up and both arms "
                "(the others collapsed), too few for a paired interval.")
    parts = []
    for m, label in (("pointing", "pointing accuracy (mean map)"), ("pointing_best_head", "best-head pointing"),
                     ("box_iou", "box IoU")):
        x = effects[m]
        lo, hi = x["t_ci"]
        verdict = "raise" if lo > 0 else "lower" if hi < 0 else "do not detectably change"
        parts.append(f"{verdict} {label} ({x['mean']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})")
    return (f"Over {n} live seeds of {n_seeds}, label-guided crops ({guided:g} of the local crops) "
            + "; ".join(parts) + ", against unguided crops from the same warm-up checkpoint.")


# ------------------------------------------------------------------------------------------ main


def _setting_key(a: argparse.Namespace) -> str:
    """A short hash of every setting but the seed list and output: seeds of the same setting are reused."""
    setting = {k: v for k, v in sorted(vars(a).items()) if k not in ("seeds", "out", "threads")}
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    from training.dinomx.data import PretrainData

    t_start = time.perf_counter()
    grid = a.size // a.patch
    train_x, train_b = synthetic(a.train, a.size, seed=10_000 + a.data_seed)
    val = synthetic(a.val, a.size, seed=30_000 + a.data_seed)
    test = synthetic(a.test, a.size, seed=20_000 + a.data_seed)
    data = PretrainData(train_x, train_b)
    cm_test = contrast_maps(test[0], grid)
    contrast = {"pointing": round(float(hits(cm_test, test[1], a.size).mean()), 4),
                "box_iou": round(float(box_iou(cm_test, test[1], a.size).mean()), 4)}
    rows = []
    done = Path(a.out).with_name(Path(a.out).name + "_seeds")  # one file per finished seed: a rerun resumes
    with tempfile.TemporaryDirectory(prefix="dinomx-pointing-") as tmp:
        for seed in a.seeds:
            cached = done / f"{_setting_key(a)}-seed{seed}.json"
            if cached.is_file():
                r = json.loads(cached.read_text())
            else:
                r = run_seed(seed, data, val, test, a, Path(tmp))
                store.write_json_atomic(cached, r)
            rows.append(r)
            d = r["difference"]
            print(f"seed {seed}: random init {r['random_init']['pointing']:.3f}, "
                  f"warm-up {r['warmup']['pointing']:.3f}, "
                  f"without {r['without']['pointing']:.3f}, with {r['with']['pointing']:.3f}; "
                  + (f"difference {d['pointing']:+.3f}" if d else "no conclusion (a run collapsed: "
                     + "; ".join(f"{k} {r[k]['verdict']}" for k in ("warmup", "without", "with")
                                 if not r[k]["alive"]) + ")")
                  + f" [{time.perf_counter() - t_start:.0f} s]", flush=True)
    live_rows = [r for r in rows if r["alive"]]
    effects = {m: paired([r["difference"][m] for r in live_rows]) for m in METRICS}
    cfg = run_config(Path("<init>"), 0.0, a.seeds[0], a)

    return {
        "task": {"image_size": a.size, "train_images": a.train, "val_images": a.val, "test_images": a.test,
                 "data_seed": a.data_seed, "patch_grid": [grid, grid]},
        "backbone": {"type": "dinov2 (random init)", "width": a.width, "depth": a.depth, "heads": a.heads,
                     "patch": a.patch, "in_chans": 1},
        "pretraining": {"preset": a.preset, "method": cfg["method"], "crops": cfg["crops"], "head": cfg["head"],
                        "optim": cfg["optim"], "dino": cfg["dino"],
                        "loss_weights": {k: cfg[k]["loss_weight"] for k in ("dino", "ibot", "koleo")},
                        "ln_k": round(math.log(int(cfg["head"]["out_dim"])), 4)},
        "budget": {"steps": a.steps, "warmup_steps": a.warmup_steps, "batch": a.batch, "seeds": a.seeds,
                   "label_guided_share": a.guided, "only_difference": {"crops.label_guided": [0.0, a.guided]},
                   "overrides": a.overrides},
        "metrics": {"pointing": "peak cell centre of the head-averaged last-layer CLS attention inside the box",
                    "pointing_best_head": "the same for the head with the best validation pointing",
                    "box_iou": "IoU of the box of the normalised map thresholded at 0.5 around its peak"},
        "chance": chance(test[1], a.size, grid),
        "contrast_baseline": contrast,
        "summary": {k: {m: _summary([r[k][m] for r in rows]) for m in METRICS}
                    for k in ("random_init", "warmup", "without", "with")},
        "summary_live": {k: {m: _summary([r[k][m] for r in live_rows]) for m in METRICS}
                         for k in ("random_init", "warmup", "without", "with")},
        "live_seeds": [r["seed"] for r in live_rows],
        "effect": effects,
        "paired_totals": {"only_with": sum(r["only_with"] for r in live_rows),
                          "only_without": sum(r["only_without"] for r in live_rows),
                          "test_images_x_seeds": a.test * len(live_rows)},
        "conclusion": conclusion(effects, len(rows), a.guided),
        "seeds": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "host": host("transformers"),
    }


def markdown(r: dict[str, Any]) -> str:
    t, bb, b, p = r["task"], r["backbone"], r["budget"], r["pretraining"]
    n_live = len(r["live_seeds"])
    lines = [f"Synthetic localisation: {t['image_size']} px grey tissue-like images with distractors and one "
             f"lesion-like object; {t['train_images']} training, {t['val_images']} validation (best-head choice) and "
             f"{t['test_images']} test images. Backbone: random-init Dinov2 (width {bb['width']}, {bb['depth']} "
             f"blocks, {bb['heads']} heads, patch {bb['patch']}: {t['patch_grid'][0]}x{t['patch_grid'][1]} cells), "
             f"`{p['preset']}` preset with {p['head']['out_dim']} prototypes. Per seed: a shared unguided warm-up of "
             f"{b['warmup_steps']} steps (batch {b['batch']}), then two arms branched from its checkpoint to step "
             f"{b['steps']}, without and with label-guided crops ({b['label_guided_share']:g} of the local crops); "
             f"the arms draw the same random numbers. A seed counts only when the collapse monitor finds the "
             f"objective alive in the warm-up and both arms: {n_live} of {len(b['seeds'])} seeds.", "",
             "| | pointing (mean map) | pointing (best head) | box IoU |", "|---|---|---|---|"]

    def cell(v: dict[str, float]) -> str:
        return f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "—"

    names = {"random_init": "random init (no pretraining)", "warmup": f"shared warm-up ({b['warmup_steps']} steps)",
             "without": "without label-guided crops", "with": f"with label-guided crops {b['label_guided_share']:g}"}
    for k, label in names.items():
        s = r["summary_live"][k] if n_live else r["summary"][k]
        lines.append(f"| {label} | " + " | ".join(cell(s[m]) for m in METRICS) + " |")

    def effect(m: str) -> str:
        e = r["effect"][m]
        if e.get("n", 0) < 2:
            return "no conclusion"
        return (f"**{e['mean']:+.3f}** (t {e['t_ci'][0]:+.3f} to {e['t_ci'][1]:+.3f}; bootstrap "
                f"{e['bootstrap_ci'][0]:+.3f} to {e['bootstrap_ci'][1]:+.3f}; {e['positive']}+ / {e['negative']}-)")

    c, cb = r["chance"], r["contrast_baseline"]
    lines += ["| with - without, paired by seed, 95% CI | " + " | ".join(effect(m) for m in METRICS) + " |",
              f"| contrast baseline (no learning) | {cb['pointing']:.3f} | | {cb['box_iou']:.3f} |",
              f"| chance: box area / image; cell centres in box | {c['box_area_share']:.3f}; "
              f"{c['cell_centre_share']:.3f} | | |", "",
              f"Means ± std over the {'live ' if n_live else ''}seeds. {r['conclusion']}", "",
              "| seed | live | random init | warm-up | without | with | with - without | best head (without / with) "
              "| IoU (without / with) | final DINO loss (without / with), ln K = " + f"{p['ln_k']:.2f} |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["seeds"]:
        w, g = row["without"], row["with"]
        d = row["difference"]
        lines.append(
            f"| {row['seed']} | {'yes' if row['alive'] else 'no'} | {row['random_init']['pointing']:.3f} | "
            f"{row['warmup']['pointing']:.3f} | {w['pointing']:.3f} | {g['pointing']:.3f} | "
            f"{(format(d['pointing'], '+.3f') if d else 'no conclusion')} | "
            f"{w['pointing_best_head']:.3f} / {g['pointing_best_head']:.3f} | "
            f"{w['box_iou']:.3f} / {g['box_iou']:.3f} | "
            f"{w['final'].get('dino', float('nan')):.3f} / {g['final'].get('dino', float('nan')):.3f} |")
    lines += ["", "Pointing: the head-averaged last-layer CLS attention's peak cell centre inside the lesion's box; "
              "best head: the head with the best validation pointing, scored on test; box IoU: the map upsampled, "
              "normalised and thresholded at 0.5 around its peak. Intervals: t (n - 1 degrees of freedom) and "
              "percentile bootstrap over the per-seed differences."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28, help="image size (px)")
    ap.add_argument("--train", type=int, default=3000, help="synthetic training images")
    ap.add_argument("--val", type=int, default=300, help="synthetic validation images (best-head choice)")
    ap.add_argument("--test", type=int, default=1000, help="synthetic test images")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="training seeds (init, crops, order)")
    ap.add_argument("--steps", type=int, default=240, help="steps of every run (warm-up included)")
    ap.add_argument("--warmup-steps", type=int, default=120, help="shared unguided steps before the arms branch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--guided", type=float, default=0.5, help="crops.label_guided share of the guided arm")
    ap.add_argument("--preset", default="demo",
                    help="training/configs/dinomx/<preset>.yaml (default: the demo's small-budget recipe)")
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=None, help="head.out_dim (prototypes; default: the preset's)")
    ap.add_argument("--hidden-dim", type=int, default=512, help="head.hidden_dim (None: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json and .md are written)")
    ap.add_argument("overrides", nargs="*", help="DINO-MX config key=value for every run")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    if a.size % a.patch:
        raise SystemExit(f"--size {a.size} is not a multiple of --patch {a.patch}")
    if not 0 < a.warmup_steps < a.steps:
        raise SystemExit(f"--warmup-steps must be within (0, --steps={a.steps}), got {a.warmup_steps}")
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    r = run_benchmark(a)
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    out.with_suffix(".md").write_text(markdown(r))
    print(r["conclusion"])
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {r['wall_s']:.0f} s")
    return r


if __name__ == "__main__":
    main()
