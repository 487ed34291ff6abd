"""``zoo explain NAME IMAGE``: attention maps, rollout and PCA images of a ViT (CAM of a CNN) for one image.

Imported by ``zoo.cli`` to build the parser, so it stays cheap: ``zoo.explain`` (torch, transformers)
is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def default_out_dir(name: str, image: str) -> Path:
    """``explain-<model name>-<image stem>/`` in the current folder (a model folder counts by its name)."""
    return Path(f"explain-{Path(name.rstrip('/')).name}-{Path(image).stem}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``zoo explain`` arguments: NAME, IMAGE, ``--out``, ``--layer``."""
    parser.add_argument("name", metavar="NAME",
                        help="built dinomx-*/linear-* entry or transformers model directory (attention, rollout, "
                             "PCA), or built CNN student entry / run folder (CAM)")
    parser.add_argument("image", metavar="IMAGE", help="PNG or JPEG file, or a .npy array (H,W) or (H,W,C)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: explain-<name>-<image stem>/)")
    parser.add_argument("--layer", type=int, default=-1,
                        help="layer of the CLS attention maps, 0-based, negative from the last (default -1)")


def main(args: argparse.Namespace) -> str:
    """Write the maps (see :func:`zoo.explain.explain`) and return a one-line summary."""
    from zoo.explain import explain, read_summary  # start-up cost: torch and transformers load when the command runs

    out = Path(args.out) if args.out else default_out_dir(args.name, args.image)
    files = explain(args.name, args.image, out, layer=args.layer)
    s = read_summary(out)
    key = "attention_mean" if s["kind"] == "vit" else "cam"
    row, col = s["peaks"][key]
    what = f"layer {s['layer']}, {s['heads']} heads" if s["kind"] == "vit" else f"class {s['label']}"
    return (f"explained {args.name} on {args.image} ({what}): {len(files)} files in {out}/, "
            f"{key} peak at row {row:g}, col {col:g} px")
