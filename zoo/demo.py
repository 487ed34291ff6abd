"""The README's main job: the whole pipeline on BreastMNIST, on the CPU, in minutes.

1. DINO-MX: self-supervised pretraining of a small ViT on the training images (no labels), kNN and
   linear-probe evaluation of its frozen features.
2. A baseline ResNet-18 student trained on the labels alone (the plain twin).
3. MedAlmighty twice: the paper's frozen teacher (a linear probe on the DINO-MX backbone; the
   teacher-strength check says whether it beats the plain twin), and an offline teacher that can
   win (an ensemble of 3 supervised ResNet-18s), each distilled into a ResNet-18 student.
4. Evaluation of every model through ``zoo.load(...).predict``: each distilled student next to its
   plain twin (difference in points), the teachers, the chance level and published figures.
5. Export of the ensemble-distilled student to ONNX INT8 with its parity receipt.
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
PAPER_STUDENT = f"medalmighty-resnet18-{DATASET}.dinomx-28"  # its teacher: BACKBONE + a linear probe (frozen)
ENSEMBLE = f"ensemble-resnet18-{DATASET}"  # 3 supervised students, logits averaged: a teacher that can win
STUDENT = f"medalmighty-resnet18-{DATASET}.ens-28"  # distilled from ENSEMBLE: the one exported and served
PRETRAIN_CONFIG = "dinomx/demo.yaml"
STUDENT_CONFIG = "medalmighty/demo.yaml"


def _anchor(fn, *args):
    try:
        return getattr(anchors, fn)(*args)
    except (FileNotFoundError, KeyError):  # published figures are optional beside a demo
        return None


def _step(i: int, text: str) -> None:
    print(f"\n[{i}/8] {text}", flush=True)


def _verdict(name: str, got: dict, plain: dict, teacher: dict, gate: dict, n_test: int) -> str:
    """One line: does distillation help this student here, and if not, why."""
    d_acc, d_auc = 100 * (got["acc"] - plain["acc"]), 100 * (got["auc"] - plain["auc"])
    if d_acc > 0 and d_auc >= 0:
        return f"{name}: distillation helps here: {d_acc:+.1f} pt ACC, {d_auc:+.1f} pt AUC over the plain twin."
    why = (f"its teacher is weaker than {gate['reference']} on validation ({', '.join(gate['weaker_on'])}; test ACC "
           f"{teacher['acc']:.3f})" if not gate["stronger"] else
           f"its teacher is stronger on validation, yet this one seed's student did not gain; one seed on "
           f"{n_test} test images is noisy, Table 2 has the paired 3-seed comparison")
    return f"{name}: distillation does not help here ({d_acc:+.1f} pt ACC, {d_auc:+.1f} pt AUC): {why}."


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
    c = m.get("collapse") or {}
    objective = c.get("verdict", "not monitored") + (
        f" (DINO loss {c['final']['dino']:.3f}, ln K = {c['ln_k']:.3f})" if "dino" in c.get("final", {}) else "")
    print(f"      objective: {objective}")
    report += ["## 1. DINO-MX backbone", "", f"`{BACKBONE}`, {m['report']['steps']} steps: test kNN ACC "
               f"{knn['acc']:.3f} (AUC {knn['auc']:.3f}), linear ACC {lin['acc']:.3f} (AUC {lin['auc']:.3f}); "
               f"objective {objective}."]
    if plus:
        report.append(f"Published MedMNIST+ ImageNet DINO ViT-B/16 at 28 px: kNN ACC {plus['knn_acc']:.3f}, "
                      f"linear ACC {plus['linear_acc']:.3f}.")

    _step(2, f"baseline student {BASELINE} (--config {STUDENT_CONFIG})")
    t = time.perf_counter()
    build(BASELINE, progress=progress, config_files=[STUDENT_CONFIG])
    times["baseline"] = time.perf_counter() - t

    _step(3, f"MedAlmighty: {PAPER_STUDENT} (frozen DINO-MX + linear teacher) and {STUDENT} "
             f"(teacher {ENSEMBLE}: 3 supervised students)")
    t = time.perf_counter()
    teachers = {}
    for name in (PAPER_STUDENT, ENSEMBLE, STUDENT):
        d = build(name, progress=progress, config_files=[STUDENT_CONFIG])
        m = json.loads((d / "metrics.json").read_text())
        if "teacher" in m:
            gate = m["teacher_gate"]
            teachers[name] = (m["teacher"]["test"], gate)
            verdict = "stronger" if gate["stronger"] else f"WEAKER on {', '.join(gate['weaker_on'])}"
            print(f"      {name}: teacher test ACC {m['teacher']['test']['acc']:.3f} AUC "
                  f"{m['teacher']['test']['auc']:.3f}; on validation {verdict} than {gate['reference']}")
    times["distil"] = time.perf_counter() - t

    _step(4, "evaluating the stored models through zoo.load(...).predict (medmnist's metrics)")
    ref = _anchor("medmnist_v2", DATASET, "ResNet-18 (28)")
    counts = test.labels[:, 0].bincount()
    chance = float(counts.max() / counts.sum())
    scores = {name: evaluate(load(name), "test") for name in (BASELINE, PAPER_STUDENT, ENSEMBLE, STUDENT)}
    plain = scores[BASELINE]
    rows = [(BASELINE, plain, "the plain twin"),
            ("teacher: DINO-MX + linear (frozen)", teachers[PAPER_STUDENT][0], "teacher"),
            (PAPER_STUDENT, scores[PAPER_STUDENT], "distilled"),
            (ENSEMBLE, scores[ENSEMBLE], "teacher"),
            (STUDENT, scores[STUDENT], "distilled")]
    report += ["", "## 2-4. Students and teachers (test split)", "",
               f"Chance (majority class) ACC {chance:.3f}. One seed: Table 2 in the README has the 3-seed, paired "
               "comparison.", "", "| model | role | ACC | AUC | Δ ACC vs plain | Δ AUC vs plain |",
               "|---|---|---|---|---|---|"]
    for name, r, role in rows:
        delta = (f"{100 * (r['acc'] - plain['acc']):+.1f} pt", f"{100 * (r['auc'] - plain['auc']):+.1f} pt") \
            if role == "distilled" else ("", "")
        print(f"      {name:42s} ACC {r['acc']:.4f}  AUC {r['auc']:.4f}  {delta[0]:>9s} {delta[1]:>9s}")
        report.append(f"| {name} | {role} | {r['acc']:.4f} | {r['auc']:.4f} | {delta[0]} | {delta[1]} |")
    if ref:
        print(f"      {'MedMNIST v2 ResNet-18 (28), 100 ep':42s} ACC {ref['acc']:.4f}  AUC {ref['auc']:.4f}")
        report.append(f"| MedMNIST v2 ResNet-18 (28), published, 100 epochs | | {ref['acc']:.4f} | {ref['auc']:.4f} "
                      "| | |")
    print(f"      chance (majority class) ACC {chance:.4f}")
    for name in (PAPER_STUDENT, STUDENT):
        line = _verdict(name, scores[name], plain, *teachers[name], len(test.labels))
        print(f"      {line}")
        report += ["", line]

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
