"""The README's main job: the whole pipeline on BreastMNIST, on the CPU, in minutes.

1. DINO-MX: self-supervised pretraining of a small ViT on the training images (no labels), kNN and
   linear-probe evaluation of its frozen features.
2. A baseline ResNet-18 student trained on the labels alone.
3. MedAlmighty: a linear-probe teacher on the DINO-MX backbone, distilled into a ResNet-18 student.
4. Evaluation of every model through ``zoo.load(...).predict``, next to published figures.
5. Export of the distilled student to ONNX INT8 with its parity receipt.
6. Attention maps of the backbone on a test image (``zoo explain``), predictions on test images.
7. Serving: the distilled student behind ``zoo serve`` (BentoML) on loopback, one image over HTTP.
8. A report (markdown) with every figure of the run.

Run with ``make demo`` (or ``zoo demo``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from PIL import Image

import zoo.anchors as anchors
import zoo.store as store
from export import to_onnx
from serving.local import LocalServer
from zoo.api import build, evaluate, load
from zoo.data import load_split, medmnist_root, npz_path
from zoo.explain import explain

DATASET = "breastmnist"
BACKBONE = f"dinomx-vit-mini-p4-{DATASET}"
BASELINE = f"baseline-resnet18-{DATASET}"
STUDENT = f"medalmighty-resnet18-{DATASET}.dinomx-28"  # the variant whose teacher is BACKBONE + a linear probe
PRETRAIN_CONFIG = "dinomx/demo.yaml"
STUDENT_CONFIG = "medalmighty/demo.yaml"


def _anchor(fn, *args):
    try:
        return getattr(anchors, fn)(*args)
    except (FileNotFoundError, KeyError):  # published figures are optional beside a demo
        return None


def _step(i: int, text: str) -> None:
    print(f"\n[{i}/8] {text}", flush=True)


def serve_once(name: str, png: bytes, timeout: float = 300) -> tuple[dict, dict]:
    """Serve ``name`` on a free loopback port, POST one image to /classify and /localize, stop the server."""
    with LocalServer([name], log=store.zoo_home() / "demo" / "serve.log") as srv:
        srv.wait_ready(timeout)
        answer = srv.post("/classify", png, model=name).json()
        localize = srv.post("/localize", png, model=name).json()
    return answer, localize


def run(progress: bool = True) -> Path:
    t0 = time.perf_counter()
    report: list[str] = [f"# Demo report: {DATASET}", ""]
    times: dict[str, float] = {}
    print(f"data: {npz_path(DATASET)} (MEDMNIST_ROOT={medmnist_root()}); store: {store.zoo_home()}")
    test = load_split(DATASET, "test")

    _step(1, f"DINO-MX pretraining of {BACKBONE} (--config {PRETRAIN_CONFIG}), no labels")
    t = time.perf_counter()
    d = build(BACKBONE, progress=progress, config_files=[PRETRAIN_CONFIG])
    times["pretrain"] = time.perf_counter() - t
    m = json.loads((d / "metrics.json").read_text())
    knn, lin = m["knn"][DATASET]["test"], m["linear"][DATASET]["test"]
    plus = _anchor("medmnist_plus", DATASET)
    line = (f"      frozen CLS features, test: kNN ACC {knn['acc']:.3f} AUC {knn['auc']:.3f}; "
            f"linear ACC {lin['acc']:.3f} AUC {lin['auc']:.3f}  ({m['report']['steps']} steps, "
            f"{m['report']['images_per_s']} images/s)")
    print(line)
    report += ["## 1. DINO-MX backbone", "", f"`{BACKBONE}`, {m['report']['steps']} steps: test kNN ACC "
               f"{knn['acc']:.3f} (AUC {knn['auc']:.3f}), linear ACC {lin['acc']:.3f} (AUC {lin['auc']:.3f})."]
    if plus:
        report.append(f"Published MedMNIST+ ImageNet DINO ViT-B/16 at 28 px: kNN ACC {plus['knn_acc']:.3f}, "
                      f"linear ACC {plus['linear_acc']:.3f}.")

    _step(2, f"baseline student {BASELINE} (--config {STUDENT_CONFIG})")
    t = time.perf_counter()
    build(BASELINE, progress=progress, config_files=[STUDENT_CONFIG])
    times["baseline"] = time.perf_counter() - t

    _step(3, f"MedAlmighty: linear-probe teacher on {BACKBONE}, distilled into {STUDENT}")
    t = time.perf_counter()
    ds = build(STUDENT, progress=progress, config_files=[STUDENT_CONFIG])
    times["distil"] = time.perf_counter() - t
    teacher = json.loads((ds / "metrics.json").read_text())["teacher"]["test"]
    print(f"      teacher (DINO-MX + linear) test ACC {teacher['acc']:.3f} AUC {teacher['auc']:.3f}")

    _step(4, "evaluating the stored models through zoo.load(...).predict (medmnist's metrics)")
    ref = _anchor("medmnist_v2", DATASET, "ResNet-18 (28)")
    rows = [("DINO-MX + linear (teacher)", teacher)]
    for name in (BASELINE, STUDENT):
        r = evaluate(load(name), "test")
        rows.append((name, r))
    report += ["", "## 2-4. Students and teacher (test split)", "", "| model | ACC | AUC |", "|---|---|---|"]
    for name, r in rows:
        print(f"      {name:34s} ACC {r['acc']:.4f}  AUC {r['auc']:.4f}")
        report.append(f"| {name} | {r['acc']:.4f} | {r['auc']:.4f} |")
    if ref:
        print(f"      {'MedMNIST v2 ResNet-18 (28), 100 ep':34s} ACC {ref['acc']:.4f}  AUC {ref['auc']:.4f}")
        report.append(f"| MedMNIST v2 ResNet-18 (28), published, 100 epochs | {ref['acc']:.4f} | {ref['auc']:.4f} |")

    _step(5, f"exporting {STUDENT} to ONNX INT8 (parity and accuracy receipt on the test split)")
    t = time.perf_counter()
    ex = to_onnx(STUDENT, "onnx-int8")
    times["export"] = time.perf_counter() - t
    acc = ex.receipt["accuracy"]
    print(f"      {ex.path}: onnxruntime test ACC {acc['exported']['acc']:.4f} (torch {acc['torch']['acc']:.4f})")
    report += ["", "## 5. Export", "", f"`{ex.path}`: INT8 test ACC {acc['exported']['acc']:.4f}, torch "
               f"{acc['torch']['acc']:.4f}; receipt `{ex.dir / 'export.json'}`."]

    _step(6, "attention maps of the backbone on a test image; predictions on test images")
    out = store.zoo_home() / "demo" / "explain"
    files = explain(BACKBONE, test.images[0, 0].numpy(), out)
    print(f"      {len(files)} files in {out} (attention per head, mean, rollout, PCA)")
    model = load(STUDENT)
    images = [Image.fromarray(test.images[i, 0].numpy()) for i in range(6)]
    pred = model.predict(images)
    for i, (lab, p) in enumerate(zip(pred.labels, pred.probs)):
        truth = model.entry.labels[int(test.labels[i, 0])]
        print(f"      test[{i}]: predicted {lab!r:18s} p={[round(float(x), 3) for x in p]}  truth {truth!r}")

    _step(7, f"serving {STUDENT} over HTTP (BentoML, onnxruntime) and classifying a test image")
    buf = io.BytesIO()
    Image.fromarray(test.images[0, 0].numpy()).save(buf, format="PNG")
    answer, localize = serve_once(STUDENT, buf.getvalue())
    print(f"      POST /classify -> {json.dumps(answer)}")
    print(f"      POST /localize -> {localize['map_kind']} map, box {localize['box']}")
    report += ["", "## 7. Serving", "", f"`zoo serve {STUDENT}`: POST /classify of test image 0 answered "
               f"{answer['label']!r} with probabilities {answer['probabilities']}; /localize gave a "
               f"{localize['map_kind']} map with box {localize['box']}."]

    _step(8, "report")
    total = time.perf_counter() - t0
    report += ["", "## Time", "", *(f"- {k}: {v:.0f} s" for k, v in times.items()), f"- total: {total:.0f} s"]
    path = store.zoo_home() / "demo" / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(report) + "\n")
    print(f"      {path}")
    print(f"\ndemo done in {total:.0f} s")
    return path


if __name__ == "__main__":
    run()
