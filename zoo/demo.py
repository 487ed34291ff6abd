"""The README's main job: build a small zoo entry on BreastMNIST on the CPU, evaluate it, predict.

Run with ``make demo`` (or ``zoo demo``). Takes a few minutes on 2 cores. As the product grows this
becomes the whole pipeline: pretrain, distil, evaluate, export, serve, report.
"""

from __future__ import annotations

import json
import time

from PIL import Image

from zoo import store
from zoo.api import build, evaluate, load
from zoo.data import load_split, medmnist_root, npz_path

DEMO_ENTRY = "baseline-resnet18-breastmnist"
DEMO_CONFIG = "medalmighty/demo.yaml"


def _published(dataset: str) -> dict[str, float] | None:
    try:
        from benchmarks.anchors import medmnist_v2

        return medmnist_v2(dataset, "ResNet-18 (28)")
    except (ImportError, FileNotFoundError, KeyError):
        return None


def run(progress: bool = True) -> None:
    t0 = time.perf_counter()
    print(f"[1/4] data: {npz_path('breastmnist')} (MEDMNIST_ROOT={medmnist_root()})", flush=True)
    test = load_split("breastmnist", "test")

    print(f"[2/4] building {DEMO_ENTRY} with configs/{DEMO_CONFIG} into {store.zoo_home()}", flush=True)
    d = build(DEMO_ENTRY, progress=progress, config_files=[DEMO_CONFIG])

    print("[3/4] evaluating the stored model through zoo.load(...).predict", flush=True)
    model = load(DEMO_ENTRY)
    r = evaluate(model, "test")
    line = f"      test ACC {r['acc']:.4f}  AUC {r['auc']:.4f} on {r['n']} images"
    ref = _published("breastmnist")
    if ref:
        line += f"  (MedMNIST v2 ResNet-18 (28), 100 epochs: ACC {ref['acc']:.3f}  AUC {ref['auc']:.3f})"
    print(line)

    print("[4/4] predicting 6 test images given as PIL images", flush=True)
    images = [Image.fromarray(test.images[i, 0].numpy()) for i in range(6)]
    pred = model.predict(images)
    for i, (lab, p) in enumerate(zip(pred.labels, pred.probs)):
        truth = model.entry.labels[int(test.labels[i, 0])]
        probs = json.dumps([round(float(x), 3) for x in p])
        print(f"      test[{i}]: predicted {lab!r:18s} p={probs}  truth {truth!r}")

    print(f"\nentry: {d}\ncard:  {d / 'README.md'}")
    print(f"demo done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    run()
