"""Label-guided crops (DINO-LG) on a synthetic localisation task: does the CLS attention point at the lesion?

Data: synthetic grey images (``--size`` px, default 28) of tissue-like texture (smooth noise at two
scales, a random brightness gradient) with distractors (2-4 small sharp dots and, in 70% of images,
a thin vessel-like curve, all bright or dark with the same contrast range as the lesion) and one
lesion-like object per image: an irregular ellipse (random size, orientation and position, a wobbly
boundary, soft edge, speckled inside), bright or dark. Its box (x0, y0, x1, y1, half-open pixels) is
the bounding box of the object's half-intensity mask. Training and held-out images are drawn with
different seeds.

Runs, per seed: one random-init ViT (``--width/--depth/--heads/--patch``, saved as a transformers
directory) is evaluated as it is; then, for each config in ``--presets`` (default ``dinov2``: DINO +
iBOT + KoLeo with Sinkhorn-Knopp targets, and ``dino``: the DINO loss with centering alone), it is
pretrained twice with the same config, seed, steps, batch and images: ``crops.label_guided=0`` and
``crops.label_guided=--guided`` (the boxes passed as ``PretrainData`` regions, so that share of
local crops contains the lesion). Everything else is the same budget.

Metric: on the held-out images, the last layer's CLS -> patch attention averaged over heads
(``zoo.maps.cls_attention``) of the saved teacher backbone (loaded with ``zoo.api.load_backbone``);
a hit when its peak cell's centre lies in the box (``zoo.maps.pointing_hit``, the pointing game).
References: the chance rate (mean box area / image area, and the share of patch-cell centres inside
the box, which is the exact hit rate of a uniformly random peak) and a contrast baseline that points
at the cell whose pixels differ most from the image median (how salient the lesion is without any
learning).

    python -m benchmarks.dinomx_pointing           # 2 presets x 2 seeds x 2 runs of 400 steps (~20 min on 2 busy cores)
    python -m benchmarks.dinomx_pointing --presets dino --seeds 0 1 2 --steps 300 --train 2000 --test 500

Writes ``benchmarks/results/dinomx_pointing.{json,md}``. Whatever the difference is, it is reported as measured.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    """A random-init 1-channel Dinov2 saved as a transformers directory (the 'pretrained' start of both runs)."""
    from transformers import Dinov2Config, Dinov2Model

    from zoo.backbones import save_backbone

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=4,
                       patch_size=patch, image_size=size, num_channels=1)
    model = Dinov2Model(cfg)
    return save_backbone(model, path, mean=(0.5,), std=(0.5,), image_size=size)


def pretrain(init: Path, images: torch.Tensor, boxes: torch.Tensor, preset: str, guided: float, seed: int,
             a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One DINO-MX run from ``init``; returns where its backbone is and what the run reported."""
    from training.config import load_config
    from training.dinomx.data import PretrainData
    from training.dinomx.recipe import run

    local = max(a.patch, round(12 * a.size / 28 / a.patch) * a.patch)  # 12 px at 28 px, a whole number of patches
    cfg = load_config(f"dinomx/{preset}.yaml", [
        f"model.backbone={init}", f"seed={seed}", f"optim.steps={a.steps}", f"optim.batch_size={a.batch}",
        f"crops.global_size={a.size}", f"crops.local_size={local}", f"crops.label_guided={guided}",
        f"head.out_dim={a.out_dim}", f"head.hidden_dim={a.hidden_dim}", "checkpoint.every=0",
        "checkpoint.resume=false", "log.progress=false", f"log.every={max(1, a.steps // 10)}", *a.overrides])
    out = work / f"run-{preset}-seed{seed}-lg{guided:g}"
    m = run(cfg, out, out / "ckpt", progress=False, data=PretrainData(images, boxes))
    if m is None:
        raise RuntimeError(f"pretraining run {out} did not finish")
    hist = m["history"]
    keys = ("loss", "dino", "ibot", "koleo")
    return {"backbone": out / "backbone", "train_seconds": m["report"]["train_seconds"],
            "losses_first_logged": {k: hist[0][k] for k in keys if hist and k in hist[0]},
            "losses_last_logged": {k: hist[-1][k] for k in keys if hist and k in hist[-1]},
            "config": {k: cfg[k] for k in ("method", "crops", "optim", "head", "dino", "ibot", "koleo")}}


# ------------------------------------------------------------------------------------------ metrics


def attention_maps(backbone_dir: Path, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Head-averaged last-layer CLS -> patch attention (N, g, g) of a saved backbone, in its own preprocessing."""
    from zoo.api import load_backbone
    from zoo.data import preprocess
    from zoo.maps import cls_attention

    bb, prep = load_backbone(backbone_dir)
    maps = [cls_attention(bb, preprocess(images[i:i + chunk], prep), layer=-1).mean(dim=1)
            for i in range(0, len(images), chunk)]
    return torch.cat(maps)


def hits(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> np.ndarray:
    """(N,) bool: does each map's peak fall in its box (the pointing game)."""
    from zoo.maps import pointing_hit

    return np.array([pointing_hit(m, b.tolist(), size) for m, b in zip(maps, boxes)], dtype=bool)


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


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


# ------------------------------------------------------------------------------------------ main


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    grid = a.size // a.patch
    train_x, train_b = synthetic(a.train, a.size, seed=10_000 + a.data_seed)
    test_x, test_b = synthetic(a.test, a.size, seed=20_000 + a.data_seed)
    contrast = hits(contrast_maps(test_x, grid), test_b, a.size)
    random_init: dict[int, float] = {}
    rows: dict[str, list[dict[str, Any]]] = {p: [] for p in a.presets}
    configs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dinomx-pointing-") as tmp:
        work = Path(tmp)
        for seed in a.seeds:
            init = random_backbone(work / f"init-seed{seed}", a.size, a.width, a.depth, a.heads, a.patch, seed)
            random_init[seed] = float(hits(attention_maps(init, test_x), test_b, a.size).mean())
            print(f"seed {seed}: pointing accuracy of the random init {random_init[seed]:.3f}", flush=True)
            for preset in a.presets:
                row: dict[str, Any] = {"seed": seed, "random_init": random_init[seed]}
                runs = {}
                for name, share in (("without", 0.0), ("with", a.guided)):
                    r = pretrain(init, train_x, train_b, preset, share, seed, a, work)
                    runs[name] = hits(attention_maps(r["backbone"], test_x), test_b, a.size)
                    row[name] = float(runs[name].mean())
                    row[f"{name}_train_seconds"] = r["train_seconds"]
                    row[f"{name}_losses"] = {"first_logged": r["losses_first_logged"],
                                             "last": r["losses_last_logged"]}
                    if share == 0.0:
                        configs[preset] = r["config"]  # the guided run's differs only in crops.label_guided
                # Paired on the same test images: hit with label-guided crops only, and without only.
                row["only_with"] = int((runs["with"] & ~runs["without"]).sum())
                row["only_without"] = int((runs["without"] & ~runs["with"]).sum())
                row["difference"] = round(row["with"] - row["without"], 4)
                rows[preset].append(row)
                print(f"seed {seed}, {preset}: pointing accuracy without label-guided crops {row['without']:.3f}, "
                      f"with ({a.guided:g}) {row['with']:.3f} (hit only with: {row['only_with']}, only without: "
                      f"{row['only_without']})", flush=True)
    import transformers

    presets = {}
    for preset, per_seed in rows.items():
        c = configs[preset]
        presets[preset] = {
            "pretraining": {"method": c["method"], "crops": c["crops"], "head": c["head"],
                            "loss_weights": {k: c[k]["loss_weight"] for k in ("dino", "ibot", "koleo")},
                            "dino_centering": c["dino"]["centering"],
                            # The DINO loss of a student that predicts nothing about the teacher's targets.
                            "log_prototypes": round(math.log(int(c["head"]["out_dim"])), 4)},
            "seeds": per_seed,
            "summary": {k: _summary([r[k] for r in per_seed]) for k in ("without", "with", "difference")},
            "paired_totals": {"only_with": sum(r["only_with"] for r in per_seed),
                              "only_without": sum(r["only_without"] for r in per_seed),
                              "test_images_x_seeds": a.test * len(per_seed)},
        }
    return {
        "task": {"image_size": a.size, "train_images": a.train, "test_images": a.test, "data_seed": a.data_seed,
                 "patch_grid": [grid, grid]},
        "backbone": {"type": "dinov2 (random init)", "width": a.width, "depth": a.depth, "heads": a.heads,
                     "patch": a.patch, "in_chans": 1},
        "budget": {"steps": a.steps, "batch": a.batch, "seeds": a.seeds, "label_guided_share": a.guided,
                   "only_difference": {"crops.label_guided": [0.0, a.guided]}, "overrides": a.overrides},
        "metric": "pointing game: peak cell centre of the head-averaged last-layer CLS attention inside the box",
        "chance": chance(test_b, a.size, grid),
        "contrast_baseline": round(float(contrast.mean()), 4),
        "random_init": {"per_seed": {str(k): v for k, v in random_init.items()},
                        "summary": _summary(list(random_init.values()))},
        "presets": presets,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "host": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "loadavg_1min_end": round(os.getloadavg()[0], 2), "machine": platform.machine(),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers.__version__},
    }


def markdown(r: dict[str, Any]) -> str:
    t, bb, b = r["task"], r["backbone"], r["budget"]
    lines = [f"Synthetic localisation: {t['image_size']} px grey tissue-like images with distractors and one "
             f"lesion-like object; {t['train_images']} training and {t['test_images']} held-out images. Backbone: "
             f"random-init Dinov2 (width {bb['width']}, {bb['depth']} blocks, {bb['heads']} heads, patch "
             f"{bb['patch']}: {t['patch_grid'][0]}x{t['patch_grid'][1]} cells). Each pretraining: {b['steps']} steps "
             f"of batch {b['batch']} from the same init; with and without label-guided crops share the seed and "
             f"config except `crops.label_guided` (0 vs {b['label_guided_share']:g}). Seeds: {b['seeds']}.", "",
             f"Metric: {r['metric']}. Mean over seeds (std, min-max).", "",
             "| | pointing accuracy | std | min-max | hit only with / only without (all seeds) |",
             "|---|---|---|---|---|"]

    def cells(v: dict[str, float]) -> str:
        return f"{v['mean']:.3f} | {v['std']:.3f} | {v['min']:.3f}-{v['max']:.3f}"

    lines.append(f"| random init (no pretraining) | {cells(r['random_init']['summary'])} | |")
    for preset, x in r["presets"].items():
        s, pt = x["summary"], x["paired_totals"]
        lines += [f"| `{preset}`: no label-guided crops | {cells(s['without'])} | |",
                  f"| `{preset}`: label-guided crops {b['label_guided_share']:g} | {cells(s['with'])} | |",
                  f"| `{preset}`: with - without (paired by seed) | {cells(s['difference'])} | "
                  f"{pt['only_with']} / {pt['only_without']} of {pt['test_images_x_seeds']} |"]
    c = r["chance"]
    lines += [f"| chance: box area / image area | {c['box_area_share']:.3f} | | | |",
              f"| chance: share of cell centres in the box | {c['cell_centre_share']:.3f} | | | |",
              f"| contrast baseline (no learning) | {r['contrast_baseline']:.3f} | | | |", "",
              "| preset | seed | random init | without | with | hit only with / only without "
              "| train s (without / with) | last DINO loss (without / with) |",
              "|---|---|---|---|---|---|---|---|"]
    notes = []
    for preset, x in r["presets"].items():
        for row in x["seeds"]:
            d0, d1 = (row[f"{k}_losses"]["last"].get("dino", float("nan")) for k in ("without", "with"))
            lines.append(f"| `{preset}` | {row['seed']} | {row['random_init']:.3f} | {row['without']:.3f} | "
                         f"{row['with']:.3f} | {row['only_with']} / {row['only_without']} | "
                         f"{row['without_train_seconds']:.0f} / {row['with_train_seconds']:.0f} | "
                         f"{d0:.3f} / {d1:.3f} |")
        p = x["pretraining"]
        last = [row[f"{k}_losses"]["last"].get("dino") for row in x["seeds"] for k in ("without", "with")]
        flat = sum(v is not None and abs(v - p["log_prototypes"]) < 0.05 for v in last)
        notes.append(f"`{preset}`: loss weights {p['loss_weights']}, `{p['dino_centering']}` teacher targets; "
                     f"{flat} of {len(last)} runs ended with a DINO loss within 0.05 of ln(prototypes) = "
                     f"{p['log_prototypes']:.3f}, the loss of a CLS head that does not predict the teacher's targets.")
    lines += ["", *notes, "", "'Hit only with / only without' count held-out images where just one of the two runs "
              "(same seed) hits: the paired view of the difference."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28, help="image size (px)")
    ap.add_argument("--train", type=int, default=3000, help="synthetic training images")
    ap.add_argument("--test", type=int, default=1000, help="synthetic held-out images")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (init, crops, order)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--guided", type=float, default=0.5, help="crops.label_guided share of the guided run")
    ap.add_argument("--presets", nargs="+", default=["dinov2", "dino"],
                    help="training/configs/dinomx/<preset>.yaml, each pretrained with and without label-guided crops")
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=1024, help="head.out_dim (prototypes)")
    ap.add_argument("--hidden-dim", type=int, default=512, help="head.hidden_dim")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json and .md are written)")
    ap.add_argument("overrides", nargs="*", help="DINO-MX config key=value for both runs")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    if a.size % a.patch:
        raise SystemExit(f"--size {a.size} is not a multiple of --patch {a.patch}")
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    r = run_benchmark(a)
    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    out.with_suffix(".md").write_text(markdown(r))
    c = r["chance"]
    for preset, x in r["presets"].items():
        sm = x["summary"]
        print(f"{preset}: pointing accuracy over {len(x['seeds'])} seed(s) without label-guided crops "
              f"{sm['without']['mean']:.3f}, with {sm['with']['mean']:.3f} "
              f"(difference {sm['difference']['mean']:+.3f})")
    print(f"random init {r['random_init']['summary']['mean']:.3f}; chance {c['box_area_share']:.3f} (area) / "
          f"{c['cell_centre_share']:.3f} (cells); contrast baseline {r['contrast_baseline']:.3f}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {r['wall_s']:.0f} s")
    return r


if __name__ == "__main__":
    main()
