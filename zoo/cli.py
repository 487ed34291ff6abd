"""The ``zoo`` command: list, info, build, train, eval, predict, export, pretrain, explain, serve, demo.

Every command ends with a one-line summary; expected failures print a one-line ``zoo: error: ...``
that says what to do: usage errors (bad arguments, unknown names, config keys or values) exit with
status 2, failures while running (a missing file, corrupted weights, an entry not built yet) with 1.

The parser is built from cheap modules only: each command imports what it runs (torch, the training
and export layers) when it runs, so ``zoo --help`` and ``zoo list`` start fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import zoo.store as store
from export.formats import FORMATS
from zoo.errors import UsageError
from zoo.registry import UnknownModelError

USAGE_ERRORS = (UsageError, UnknownModelError)


def _cmd_list(a) -> str:
    from zoo.registry import list_models  # start-up cost: loaded when the command runs

    names = list_models(a.pattern, variants=a.variants)
    built = 0
    for n in names:
        mark = store.is_built(n)
        built += mark
        if not a.built or mark:
            print(f"{n}{'  [built]' if mark else ''}")
    if not names:
        return f"no zoo model matches {a.pattern!r}"
    matching = f" matching {a.pattern!r}" if a.pattern else ""
    return f"{len(names)} models{matching}, {built} built in {store.zoo_home()}"


def _cmd_info(a) -> str:
    from zoo.loading import read_config  # start-up cost: loaded when the command runs
    from zoo.registry import get_entry, variants_of  # start-up cost: loaded when the command runs

    e = get_entry(a.name)
    for k, v in e.to_dict().items():
        print(f"{k:12s} {v}")
    others = [n for n in variants_of(e.name) if n != e.name]
    if others:
        print(f"{'variants':12s} {', '.join(others)}")
    if store.is_built(e.name):
        d = store.entry_dir(e.name)
        m = json.loads((d / "metrics.json").read_text())
        cfg = read_config(d)
        print(f"{'built':12s} {d} ({cfg['created']})")
        if "test" in m:
            print(f"{'test':12s} acc {m['test']['acc']:.4f}  auc {m['test']['auc']:.4f}")
        for flag, r in m.get("knn", {}).items():
            print(f"{'kNN test':12s} {flag}: acc {r['test']['acc']:.4f}  auc {r['test']['auc']:.4f}")
        return f"{e.name}: built, card at {d / 'README.md'}"
    return f"{e.name}: not built; build it with `zoo build {e.name}`"


def _cmd_build(a) -> str:
    from zoo.api import build  # start-up cost: loaded when the command runs

    t0 = time.perf_counter()
    d = build(a.name, a.overrides, progress=not a.quiet, config_files=a.config)
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


def _cmd_predict(a) -> str:
    from zoo.images import ImageError, read_image  # start-up cost: loaded when the command runs
    from zoo.loading import load  # start-up cost: loaded when the command runs

    model = load(a.name)
    images = []
    for p in a.images:  # the server's rule for every file: 8-bit PNG/JPEG/.npy, never clipped or truncated
        try:
            images.append(read_image(Path(p)))
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot read {p}: no such file") from None
        except ImageError as e:
            raise ValueError(f"cannot read {p} as an image: {e.message}") from None
    pred = model.predict(images)
    for p, lab, probs in zip(a.images, pred.labels, pred.probs):
        print(json.dumps({"image": p, "label": lab, "probs": [round(float(x), 6) for x in probs]}))
    return f"predicted {len(pred)} image(s) with {a.name}"


def _cmd_export(a) -> str:
    from export import export  # start-up cost: loaded when the command runs

    kw = {"opset": a.opset, "with_localization": a.with_localization, "max_images": a.max_images}
    if a.format == "tensorrt":
        kw["precision"] = a.precision or "fp16"
    elif a.precision is not None:
        raise UsageError(f"--precision applies to --format tensorrt; {a.format} fixes its own precision")
    r = export(a.name, a.format, out=a.out, **kw)
    acc, parity = r.receipt["accuracy"], r.receipt["parity"]
    print(f"files:   {r.dir}\nreceipt: {r.dir / 'export.json'}")
    got, ref = ({k: "n/a" if v is None else f"{v:.4f}" for k, v in acc[s].items()} for s in ("exported", "torch"))
    return (f"exported {a.name} as {a.format} to {r.path}: {acc['runtime']} test acc {got['acc']} auc {got['auc']} "
            f"(torch {ref['acc']} / {ref['auc']}), max |logit diff| {parity['max_abs_logit_diff']:.2g}, "
            f"labels agree on {parity['n'] - parity['labels_differ']}/{parity['n']}")


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
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list zoo models")
    s.add_argument("pattern", nargs="?", help="glob or substring, e.g. 'baseline-*' or pathmnist")
    s.add_argument("--built", action="store_true", help="only entries built in ZOO_HOME")
    s.add_argument("--variants", action="store_true",
                   help="also the tagged variants (other input sizes or teachers: <name>.<tag>)")
    s.set_defaults(fn=_cmd_list)
    s = sub.add_parser("info", help="show a zoo entry")
    s.add_argument("name")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("build", help="train a zoo entry with its recipe into ZOO_HOME")
    s.add_argument("name")
    s.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3")
    s.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="override file applied on the entry's recipe, e.g. medalmighty/cpu-fast.yaml (repeatable)")
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
    s = sub.add_parser("predict", help="classify image files")
    s.add_argument("name")
    s.add_argument("images", nargs="+")
    s.set_defaults(fn=_cmd_predict)
    s = sub.add_parser("export", help="export a built model to ONNX (FP32/FP16/INT8) or TensorRT, with receipts")
    s.add_argument("name", help="zoo name, or the folder of a built entry / run")
    s.add_argument("--format", default="onnx", metavar="FORMAT",
                   help="; ".join(f"{n}: {f.summary}" for n, f in FORMATS.items()) + " (default onnx)")
    s.add_argument("--out", metavar="DIR", help="output folder (default: <ZOO_HOME>/<name>/export/<format>/)")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset, 13-20 (default 17)")
    s.add_argument("--with-localization", action="store_true",
                   help="add a second output: class-activation maps (CNNs) or CLS attention (ViTs)")
    s.add_argument("--precision", metavar="P", help="TensorRT engine precision: fp32 | fp16 (default) | int8")
    s.add_argument("--max-images", type=int, metavar="N", help="check on N test images (default: the whole split)")
    s.set_defaults(fn=_cmd_export)
    _add_plugin(sub, "pretrain", "training.dinomx.cli", "DINO-MX self-supervised pretraining of a ViT backbone")
    _add_plugin(sub, "explain", "zoo.explain_cli", "attention maps, rollout and PCA images (CAM for CNNs)")
    _add_plugin(sub, "serve", "serving.cli", "serve zoo models over HTTP (BentoML): /classify, /localize")
    s = sub.add_parser("demo", help="the README's end-to-end demo (BreastMNIST, CPU, minutes)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_demo)
    return p


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


