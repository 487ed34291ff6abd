"""The ``zoo`` command: list, info, build, train, eval, predict, export, push, pretrain, explain, serve, bento, demo.

Every command ends with a one-line summary; expected failures print a one-line ``zoo: error: ...``
that says what to do: usage errors (bad arguments, unknown names, config keys or values) exit with
status 2, failures while running (a missing file, corrupted weights, an entry not built yet) with 1.
With ``--json`` (``list``, ``info``, ``predict``, ``eval``) stdout holds one JSON document and the
summary goes to stderr.

Predictions have one schema wherever they come from: ``zoo predict`` rows carry the keys of the HTTP
``/classify`` answer (``serving/schemas.py``), plus the image::

    {"image": "scan.png", "label": "malignant", "labels": ["malignant"],
     "probabilities": {"malignant": 0.91, "normal, benign": 0.09}, "threshold": 0.5}

``label`` is the decision (``p > threshold`` for binary tasks, the argmax otherwise; for multi-label
tasks the most probable label), ``labels`` every label above ``threshold`` for multi-label tasks and
``[label]`` otherwise, ``probabilities`` one per label (binary tasks: ``1 - p`` and ``p`` over the two
labels), ``threshold`` the decision threshold of sigmoid tasks (``null`` for softmax tasks);
``--top-k K`` adds ``top_k``: the K most probable ``{"label", "probability"}``.

The parser is built from cheap modules only: each command imports what it runs (torch, the training
and export layers) when it runs, so ``zoo --help`` and ``zoo list`` start fast (no torch: listing
reads the registry and the entry folders' JSON and safetensors headers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import zoo.hub as hub
import zoo.store as store
from export.formats import FORMATS
from zoo import __version__
from zoo.card import folder_facts
from zoo.errors import UsageError
from zoo.registry import UnknownModelError, get_entry, list_models, variants_of

USAGE_ERRORS = (UsageError, UnknownModelError)


def _cmd_list(a) -> str:
    if a.built or a.csv:
        return _leaderboard(a)
    names = list_models(a.pattern, variants=a.variants)
    built = [store.is_built(n) for n in names]
    if a.json:
        print(json.dumps([{"name": n, "built": b} for n, b in zip(names, built)]))
    else:
        for n, b in zip(names, built):
            print(f"{n}{'  [built]' if b else ''}")
    if not names:
        return f"no zoo model matches {a.pattern!r}"
    matching = f" matching {a.pattern!r}" if a.pattern else ""
    return f"{len(names)} models{matching}, {sum(built)} built in {store.zoo_home()}"


LEADERBOARD = ("name", "dataset", "eval", "test_acc", "test_auc", "params", "mb", "input", "latency_ms",
               "latency_format")


def leaderboard_row(name: str) -> dict[str, Any]:
    """One built entry as a leaderboard row (timm's results CSV columns, MedMNIST's figures)."""
    d = store.entry_dir(name)
    cfg = store.read_config(d)
    e = cfg["entry"]
    m = store.read_json_object(d / "metrics.json")
    test, kind = m.get("test"), "test"
    if not isinstance(test, dict):  # a DINO-MX backbone: kNN on its own dataset's frozen features
        test, kind = (m.get("knn") or {}).get(e.get("dataset"), {}).get("test", {}), "knn-test"
    facts = folder_facts(d, cfg)
    lat = facts["latency"] or {}
    return {"name": name, "dataset": e.get("dataset"), "eval": kind, "test_acc": test.get("acc"),
            "test_auc": test.get("auc"), "params": facts["parameters"], "mb": round(facts["weights_bytes"] / 1e6, 2),
            "input": f"{e.get('in_chans')}x{e.get('input_size')}x{e.get('input_size')}",
            "latency_ms": lat.get("ms"), "latency_format": lat.get("format")}


def _leaderboard(a) -> str:
    """``zoo list --built``: the built entries, sorted by dataset then test ACC (best first)."""
    names = list_models(a.pattern, variants=True)  # a built variant is always shown
    rows = []
    for n in filter(store.is_built, names):
        try:
            rows.append(leaderboard_row(n))
        except store.WeightsCorruptedError as e:  # one damaged entry does not hide the others
            print(f"zoo: warning: {' '.join(str(e).split())}", file=sys.stderr)
    rows.sort(key=lambda r: (r["dataset"] or "", -(r["test_acc"] if r["test_acc"] is not None else -1), r["name"]))
    if a.csv:
        def write(p: Path) -> None:
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=LEADERBOARD)
                w.writeheader()
                w.writerows(rows)

        store.write_atomic(Path(a.csv), write)
    if a.json:
        print(json.dumps(rows))
    elif rows:
        table = [("name", "test ACC", "test AUC", "params", "MB", "input", "latency")] + [
            (r["name"] + (" (kNN)" if r["eval"] != "test" else ""), _f4(r["test_acc"]), _f4(r["test_auc"]),
             "?" if r["params"] is None else f"{r['params'] / 1e6:.2f}M", f"{r['mb']:.2f}", r["input"],
             "" if r["latency_ms"] is None else f"{r['latency_ms']:.3g} ms ({r['latency_format']})") for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    matching = f" matching {a.pattern!r}" if a.pattern else ""
    wrote = f"; wrote {a.csv}" if a.csv else ""
    return f"{len(rows)} built{matching} of {len(names)} models in {store.zoo_home()}{wrote}"


def _f4(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _cmd_info(a) -> str:
    if hub.is_hub_ref(a.name):
        return _info_built(a, hub.fetch(a.name), [])
    e = get_entry(a.name)
    others = [n for n in variants_of(e.name) if n != e.name]
    if store.is_built(e.name):
        return _info_built(a, store.entry_dir(e.name), others)
    if a.json:
        print(json.dumps({"name": e.name, "built": False, "entry": e.to_dict(), "variants": others,
                          "build": f"zoo build {e.name}"}))
    else:
        for k, v in e.to_dict().items():
            print(f"{k:12s} {v}")
        if others:
            print(f"{'variants':12s} {', '.join(others)}")
    return f"{e.name}: not built; build it with `zoo build {e.name}`"


def _info_built(a, d: Path, others: list[str]) -> str:
    """A built entry as it is in the store: config.json's entry, lineage, metrics, files with sizes."""
    cfg = store.read_config(d)
    m = store.read_json_object(d / "metrics.json")
    facts = folder_facts(d, cfg)
    name = cfg["entry"].get("name", d.name)
    if a.json:
        print(json.dumps({"name": name, "built": True, "dir": str(d), "created": cfg.get("created"),
                          "entry": cfg["entry"], "lineage": cfg.get("lineage") or {}, "metrics": m,
                          "parameters": facts["parameters"], "weights_bytes": facts["weights_bytes"],
                          "files": facts["files"], "exports": facts["exports"], "variants": others,
                          "hub": store.read_json_object(d / "hub.json") or None}))
        return f"{name}: built, card at {d / 'README.md'}"
    for k, v in cfg["entry"].items():
        print(f"{k:12s} {v}")
    if others:
        print(f"{'variants':12s} {', '.join(others)}")
    print(f"{'built':12s} {d} ({cfg.get('created')})")
    hub = store.read_json_object(d / "hub.json")
    if hub:
        print(f"{'from':12s} hf-hub:{hub.get('repo_id')}@{hub.get('revision')} (commit {hub.get('commit')})")
    for k, v in (cfg.get("lineage") or {}).items():
        print(f"{'lineage':12s} {k}: {v}")
    for split in ("val", "test"):
        if isinstance(m.get(split), dict):
            print(f"{split:12s} acc {m[split]['acc']:.4f}  auc {m[split]['auc']:.4f}")
    if isinstance(m.get("teacher"), dict):
        t = m["teacher"]
        print(f"{'teacher':12s} val acc {t['val']['acc']:.4f} auc {t['val']['auc']:.4f}; "
              f"test acc {t['test']['acc']:.4f} auc {t['test']['auc']:.4f}")
    for flag, r in m.get("knn", {}).items():
        print(f"{'kNN test':12s} {flag}: acc {r['test']['acc']:.4f}  auc {r['test']['auc']:.4f}")
    if "best_epoch" in m:
        print(f"{'epochs':12s} best {m['best_epoch']} of {m.get('epochs')}, seed {m.get('seed')}, "
              f"wall time {m.get('wall_time_s')} s")
    params = "?" if facts["parameters"] is None else f"{facts['parameters']:,}"
    print(f"{'parameters':12s} {params} ({facts['weights_bytes'] / 1e6:.2f} MB of weights)")
    for f in facts["files"]:
        sha = f"  sha256 {f['sha256'][:16]}..." if "sha256" in f else ""
        print(f"{'file':12s} {f['path']}  {f['bytes'] / 1e6:.2f} MB{sha}")
    for x in facts["exports"]:
        lat = f", {x['latency']['ms']:.3g} ms/image" if x["latency"] else ""
        print(f"{'export':12s} {x['format']}: {x['dir']}/ ({x['bytes'] / 1e6:.2f} MB{lat})")
    return f"{name}: built, card at {d / 'README.md'}"


def _cmd_build(a) -> str:
    from zoo.api import build  # start-up cost: loaded when the command runs

    t0 = time.perf_counter()
    overrides = list(a.overrides) + (["distill.require_stronger_teacher=true"] if a.require_stronger_teacher else [])
    d = build(a.name, overrides, progress=not a.quiet, config_files=a.config)
    m = json.loads((d / "metrics.json").read_text())
    print(f"entry: {d}\ncard:  {d / 'README.md'}")
    if "knn" in m:
        knn = "; ".join(f"{f} kNN test acc {r['test']['acc']:.4f}" for f, r in m["knn"].items())
        return f"built {a.name} in {time.perf_counter() - t0:.1f} s: {knn}"
    return (f"built {a.name} in {time.perf_counter() - t0:.1f} s: test acc {m['test']['acc']:.4f} "
            f"auc {m['test']['auc']:.4f} (val auc {m['val']['auc']:.4f})")


def _cmd_train(a) -> str:
    from training.entries import train_config  # start-up cost: loaded when the command runs

    t0 = time.perf_counter()
    d = train_config(a.config, a.overrides, progress=not a.quiet)
    m = json.loads((d / "metrics.json").read_text())
    print(f"run:  {d}\ncard: {d / 'README.md'}")
    if "knn" in m:  # a DINO-MX config: a pretrained backbone, evaluated by kNN
        knn = "; ".join(f"{f} kNN test acc {r['test']['acc']:.4f}" for f, r in m["knn"].items())
        return f"pretrained {d.name} in {time.perf_counter() - t0:.1f} s: {knn}"
    return (f"trained {d.name} in {time.perf_counter() - t0:.1f} s: test acc {m['test']['acc']:.4f} "
            f"auc {m['test']['auc']:.4f}")


def _cmd_eval(a) -> str:
    import numpy as np

    from zoo.loading import evaluate, load  # start-up cost: loaded when the command runs

    r = evaluate(load(a.name), split=a.split)
    probs = r.pop("probs")
    if a.save_scores:
        np.save(a.save_scores, probs)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} on {r['dataset']}/{r['split']} ({r['n']} images): acc {r['acc']:.4f}  auc {r['auc']:.4f}")
    return f"evaluated {r['model']} on {r['split']}: acc {r['acc']:.4f} auc {r['auc']:.4f}"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


def predict_inputs(items: list[str]) -> list[tuple[str, Path]]:
    """(name shown, file) of every image ``zoo predict`` was given: files as given, every PNG/JPEG/.npy of a
    folder (sorted, not recursive), the ``path`` column of a CSV manifest (relative to the CSV's folder)."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UsageError(f"{item}: no PNG, JPEG or .npy file in this folder")
            out += [(os.path.join(item, f.name), f) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            with open(p, newline="") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise UsageError(f"{item}: a manifest needs a 'path' column (image paths relative to its folder); "
                                     f"it has {', '.join(reader.fieldnames or []) or 'no header'}")
                rows = [r["path"].strip() for r in reader if (r.get("path") or "").strip()]
            if not rows:
                raise UsageError(f"{item}: the manifest lists no image")
            out += [(r, p.parent / Path(r).expanduser()) for r in rows]
        else:
            out.append((item, p))
    return out


def prediction_rows(probs, names: list[str], task: str, images: list[str], threshold: float | None = None,
                    top_k: int | None = None) -> list[dict[str, Any]]:
    """``/classify``'s keys (label, labels, probabilities, threshold) plus ``image`` (and ``top_k``), per image.

    Decisions follow the task table (:mod:`zoo.tasks`); ``threshold`` replaces a sigmoid task's 0.5.
    """
    import numpy as np  # start-up cost: loaded when the command runs

    from zoo.tasks import get_task  # start-up cost: torch, loaded when the command runs

    t = get_task(task)
    if threshold is not None:
        t = dataclasses.replace(t, threshold=threshold)
    probs = np.asarray(probs, dtype=np.float32)
    idx = t.decide(probs)
    sets = t.positives(probs) if t.multilabel else None
    rows = []
    for i, image in enumerate(images):
        p = probs[i]
        row = {"image": image, "label": names[idx[i]],
               "labels": [names[j] for j in np.flatnonzero(sets[i])] if sets is not None else [names[idx[i]]],
               "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}, "threshold": t.threshold}
        if top_k:
            order = np.argsort(-p, kind="stable")[:top_k]
            row["top_k"] = [{"label": names[j], "probability": round(float(p[j]), 6)} for j in order]
        rows.append(row)
    return rows


def _write_predictions(path: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    """``--out``: JSON lines when the name ends .jsonl, else CSV (image, label, one probability per label)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            if path.suffix.lower() == ".jsonl":
                f.writelines(json.dumps(r) + "\n" for r in rows)
                return
            w = csv.writer(f)
            w.writerow(["image", "label", *names])
            w.writerows([r["image"], r["label"], *(r["probabilities"][n] for n in names)] for r in rows)

    store.write_atomic(path, write)


def _cmd_predict(a) -> str:
    from zoo.images import ImageError, read_image  # start-up cost: loaded when the command runs
    from zoo.loading import load  # start-up cost: loaded when the command runs
    from zoo.tasks import get_task  # start-up cost: loaded when the command runs

    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.device.startswith("cuda"):
        import torch  # start-up cost: loaded when the command runs

        if not torch.cuda.is_available():
            raise UsageError(f"--device {a.device}: no CUDA device is available here; use --device cpu")
    inputs = predict_inputs(a.images)
    model = load(a.name, device=a.device)
    e = model.entry
    task, names = get_task(e.task), list(e.labels)
    if a.threshold is not None and (not task.sigmoid or not 0 <= a.threshold <= 1):
        raise UsageError(f"--threshold applies to sigmoid tasks (binary, multi-label) and takes a probability in "
                         f"[0, 1]; {e.name} is {e.task}" + (f", got {a.threshold}" if task.sigmoid else ""))
    n_scores = task.num_scores(len(names))
    if a.top_k is not None and not 1 <= a.top_k <= n_scores:
        raise UsageError(f"--top-k must be 1..{n_scores} for {e.name} ({n_scores} probabilities), got {a.top_k}")
    stream = not a.json and not a.out
    rows: list[dict[str, Any]] = []
    for start in range(0, len(inputs), a.batch_size):
        chunk = inputs[start : start + a.batch_size]
        images = []
        for shown, p in chunk:  # the server's rule for every file: 8-bit PNG/JPEG/.npy, never clipped or truncated
            try:
                images.append(read_image(p))
            except FileNotFoundError:
                raise FileNotFoundError(f"cannot read {shown}: no such file") from None
            except ImageError as err:
                raise ValueError(f"cannot read {shown} as an image: {err.message}") from None
        pred = model.predict(images, batch_size=a.batch_size)
        got = prediction_rows(pred.probs, names, e.task, [s for s, _ in chunk], a.threshold, a.top_k)
        if stream:
            for r in got:
                print(json.dumps(r), flush=True)
        rows += got
    if a.out:
        _write_predictions(Path(a.out), rows, names)
    if a.json:
        print(json.dumps(rows))
    return f"predicted {len(rows)} image(s) with {a.name}" + (f"; wrote {a.out}" if a.out else "")


def _cmd_export(a) -> str:
    from export import export  # start-up cost: loaded when the command runs

    kw = {"opset": a.opset, "with_localization": a.with_localization, "max_images": a.max_images,
          "exporter": a.exporter}
    if a.uint8_input:
        kw["uint8_input"] = True  # export.export refuses it for TensorRT with the reason
    if a.format == "tensorrt":
        kw["precision"] = a.precision or "fp16"
    elif a.precision is not None:
        raise UsageError(f"--precision applies to --format tensorrt; {a.format} fixes its own precision")
    r = export(a.name, a.format, out=a.out, **kw)
    acc, parity = r.receipt["accuracy"], r.receipt["parity"]
    print(f"files:   {r.dir}\nreceipt: {r.dir / 'export.json'}")
    used = r.receipt.get("exporter") or {}
    if used.get("fallback"):
        print(f"exporter: {used.get('used')} ({used['fallback']})")
    got, ref = ({k: "n/a" if v is None else f"{v:.4f}" for k, v in acc[s].items()} for s in ("exported", "torch"))
    return (f"exported {a.name} as {a.format} to {r.path}: {acc['runtime']} test acc {got['acc']} auc {got['auc']} "
            f"(torch {ref['acc']} / {ref['auc']}), max |logit diff| {parity['max_abs_logit_diff']:.2g}, "
            f"labels agree on {parity['n'] - parity['labels_differ']}/{parity['n']}")


def _cmd_push(a) -> str:
    from zoo.loading import resolve  # start-up cost: loaded when the command runs

    r = resolve(a.name)
    res = hub.push(r.dir, a.repo_id, revision=a.revision, private=a.private,
               dry_run=Path(a.dry_run) if a.dry_run else None, commit_message=a.message)
    for f in res.files:
        print(f)
    if res.folder is not None:
        return (f"dry run: {len(res.files)} files for {res.repo_id}@{res.revision} written to {res.folder}; "
                "nothing uploaded")
    return f"pushed {a.name} to {res.repo_id}@{res.revision} ({len(res.files)} files): {res.url}"


def _cmd_demo(a) -> str:
    from zoo.demo import run  # start-up cost: loaded when the command runs

    run(progress=not a.quiet)
    return "demo finished"


def _lazy(module: str, fn: str):
    """A command implemented in another package, imported only when it runs (keeps `zoo list` fast)."""

    def run(a) -> str:
        import importlib

        return getattr(importlib.import_module(module), fn)(a)

    return run


def _add_plugin(sub, name: str, module: str, help: str) -> None:
    """Subcommands owned by other packages: ``module.add_arguments(parser)`` and ``module.main(args) -> str``.

    Those modules must import cheaply (heavy imports inside ``main``)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the package is not installed: no such subcommand
            return
        raise
    s = sub.add_parser(name, help=help)
    mod.add_arguments(s)
    s.set_defaults(fn=_lazy(module, "main"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="MedMNIST model zoo: list, build, evaluate, predict.")
    p.add_argument("--version", action="version", version=f"medzoo {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list zoo models; --built: a leaderboard of the built ones")
    s.add_argument("pattern", nargs="?", help="glob or substring, e.g. 'baseline-*' or pathmnist")
    s.add_argument("--built", action="store_true",
                   help="the built entries (variants too) as a leaderboard: test ACC/AUC, parameters, MB of "
                        "weights, input, latency from an export receipt; sorted by dataset, then ACC")
    s.add_argument("--variants", action="store_true",
                   help="also the tagged variants (other input sizes or teachers: <name>.<tag>)")
    s.add_argument("--json", action="store_true", help="one JSON array on stdout (names, or --built's rows)")
    s.add_argument("--csv", metavar="PATH", help="write the --built leaderboard rows to PATH (implies --built)")
    s.set_defaults(fn=_cmd_list)
    s = sub.add_parser("info", help="show a zoo entry: as built (files, metrics, lineage), else as registered")
    s.add_argument("name", help="zoo name, or hf-hub:<org>/<repo>[@<revision>]")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("build", help="train a zoo entry with its recipe into ZOO_HOME")
    s.add_argument("name")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3")
    s.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="override file applied on the entry's recipe, e.g. medalmighty/cpu-fast.yaml (repeatable)")
    s.add_argument("--require-stronger-teacher", action="store_true",
                   help="refuse to distil from a teacher whose validation ACC/AUC is not above the plain student's "
                        "(or the majority-class rate): the override distill.require_stronger_teacher=true")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_cmd_build)
    s = sub.add_parser("train", help="run a recipe config into a run folder")
    s.add_argument("config", help="a YAML file (a path, or a shipped config such as medalmighty/cpu-fast.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_train)
    s = sub.add_parser("eval", help="ACC/AUC of a built model on a MedMNIST split")
    s.add_argument("name", help="zoo name, or the folder of a built entry / run")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--json", action="store_true", help="print one JSON object (acc, auc, n, ...)")
    s.add_argument("--save-scores", metavar="PATH", help="save the (N, C) probabilities as .npy")
    s.set_defaults(fn=_cmd_eval)
    s = sub.add_parser("predict", help="classify images: files, folders or CSV manifests",
                       description="One row per image with the keys of the HTTP /classify answer: image, label, "
                                   "labels, probabilities {label: p}, threshold (and top_k with --top-k); JSON lines "
                                   "on stdout unless --out or --json.")
    s.add_argument("name", help="zoo name, hf-hub:<org>/<repo>[@<revision>], or the folder of a built entry / run")
    s.add_argument("images", nargs="+", metavar="IMAGE|DIR|MANIFEST.csv",
                   help="PNG/JPEG/.npy files, folders (every PNG/JPEG/.npy in them, sorted), or CSV manifests with a "
                        "'path' column (relative to the CSV's folder)")
    s.add_argument("--out", metavar="PATH", help="write the rows: JSON lines if PATH ends .jsonl, else CSV (image, "
                                                  "label, one probability column per label)")
    s.add_argument("--json", action="store_true", help="one JSON array of the rows on stdout")
    s.add_argument("--batch-size", type=int, default=64, metavar="N", help="images read and run at once (default 64)")
    s.add_argument("--threshold", type=float, metavar="T",
                   help="decision threshold of sigmoid tasks (binary, multi-label; default 0.5)")
    s.add_argument("--top-k", type=int, metavar="K", help="add the K most probable labels (top_k)")
    s.add_argument("--device", default="cpu", type=_device, help="cpu (default) or cuda[:N]")
    s.set_defaults(fn=_cmd_predict)
    s = sub.add_parser("export", help="export a built model to ONNX (FP32/FP16/INT8) or TensorRT, with receipts")
    s.add_argument("name", help="zoo name, or the folder of a built entry / run")
    s.add_argument("--format", default="onnx", metavar="FORMAT",
                   help="; ".join(f"{n}: {f.summary}" for n, f in FORMATS.items()) + " (default onnx)")
    s.add_argument("--out", metavar="DIR", help="output folder (default: <ZOO_HOME>/<name>/export/<format>/)")
    s.add_argument("--opset", type=int, default=18,
                   help="ONNX opset, 13-20 (default 18); below 18 the legacy exporter runs")
    s.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.onnx.export(..., dynamo=True) (default; falls back to legacy with the reason in the "
                        "receipt) or the TorchScript exporter")
    s.add_argument("--uint8-input", action="store_true",
                   help="the graph takes uint8 images (N, H, W, C) of any size and does the entry's preprocessing "
                        "(bundle in <format>-uint8/; ONNX formats, opset 18+)")
    s.add_argument("--with-localization", action="store_true",
                   help="add a second output: class-activation maps (CNNs) or CLS attention (ViTs)")
    s.add_argument("--precision", metavar="P", help="TensorRT engine precision: fp32 | fp16 (default) | int8")
    s.add_argument("--max-images", type=int, metavar="N", help="check on N test images (default: the whole split)")
    s.set_defaults(fn=_cmd_export)
    s = sub.add_parser("push", help="publish a built entry to the Hugging Face Hub (the card as its README)")
    s.add_argument("name", help="zoo name, or the folder of a built entry / run")
    s.add_argument("repo_id", metavar="REPO_ID", help="<org or user>/<name> on the Hub (created if missing)")
    s.add_argument("--revision", metavar="REV", help="branch to commit to (created if missing; default main)")
    s.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    s.add_argument("--message", metavar="TEXT", help="commit message (default: name, medzoo version, test figures)")
    s.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded into DIR; upload nothing")
    s.set_defaults(fn=_cmd_push)
    _add_plugin(sub, "pretrain", "training.dinomx.cli", "DINO-MX self-supervised pretraining of a ViT backbone")
    _add_plugin(sub, "explain", "zoo.explain_cli", "attention maps, rollout and PCA images (CAM for CNNs)")
    _add_plugin(sub, "serve", "serving.cli", "serve zoo models over HTTP (BentoML): /classify, /localize")
    _add_plugin(sub, "bento", "serving.bento", "package a zoo model as a BentoML bento")
    s = sub.add_parser("demo", help="the README's end-to-end demo (BreastMNIST, CPU, minutes)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_demo)
    return p


def _device(s: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: give cpu or cuda (cuda:N for another GPU)")
    return s


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted anywhere after the command (also after
    ``--config FILE``), for the commands that take them."""
    p = parser()
    a, extra = p.parse_known_args(argv)
    stray = [x for x in extra if not _OVERRIDE.match(x)]
    if extra and (stray or not hasattr(a, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        a.overrides = list(a.overrides) + extra
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # Failures a user can meet (their message says what to do): no traceback.
    expected = (UsageError, UnknownModelError, store.WeightsCorruptedError, ValueError, OSError)
    try:
        summary = a.fn(a)
    except expected as e:
        msg = str(e).replace("\n", " ")
        print(f"zoo: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, USAGE_ERRORS) or getattr(e, "exit_status", 1) == 2 else 1
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    # Summaries go to stderr when stdout carries JSON, so `zoo eval --json` stays parseable.
    print(summary, file=sys.stderr if getattr(a, "json", False) else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


