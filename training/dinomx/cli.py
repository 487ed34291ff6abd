"""``zoo pretrain CONFIG [key=value ...]``: DINO-MX pretraining into ``<output_dir>/<run_name>/``.

Imports nothing heavy at module level (the ``zoo`` command builds its parser from it).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a dinomx YAML (a path, or a shipped config such as dinomx/dinov2.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10 model.backbone=vit-test")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(a: argparse.Namespace) -> str:
    from training.dinomx.recipe import pretrain_config  # start-up cost: torch loads when the command runs

    d, m = pretrain_config(a.config, a.overrides, progress=not a.quiet)
    if m is None:
        return f"process finished its share of {d}"
    knn = "; ".join(f"{f} kNN test acc {r['test']['acc']:.4f}" for f, r in m.get("knn", {}).items())
    print(f"run:      {d}\nbackbone: {d / 'backbone'}  (transformers.AutoModel.from_pretrained)")
    c = m.get("collapse", {})
    print(f"objective: {c.get('verdict', 'not monitored')}"
          + (f" (DINO loss {c['final']['dino']:.3f}, ln K = {c['ln_k']:.3f})" if "dino" in c.get("final", {}) else ""))
    return f"pretrained {d.name}: {m['report']['steps']} steps in {m['wall_time_s']:.0f} s; {knn or 'no eval'}"
