"""``zoo bento NAME [NAME ...]``: a BentoML bento that carries its models, so serving it needs no zoo store.

::

    zoo bento baseline-resnet18-breastmnist [more names] [--format onnx|onnx-fp16|onnx-int8]
              [--onnx-only | --with-torch] [--backend onnx|torch] [--tag medzoo:TAG] [--models-only]
    bentoml serve medzoo:TAG                # no $ZOO_HOME, no MedMNIST files, nothing exported at start-up
    bentoml containerize medzoo:TAG         # a Docker image of it (needs Docker)

For each name the ONNX bundle with its localization output is exported when missing or stale
(``export.to_onnx(name, fmt, with_localization=True)``, parity-checked on the entry's test split, so
that step needs the MedMNIST files; ``zoo serve`` makes the same bundle) and saved into BentoML's
model store with ``bentoml.models.create`` as a small entry folder: ``config.json``, ``config.yaml``,
``metrics.json``, the card ``README.md`` and ``export/<format>/`` (``model.onnx``, ``export.json``,
``preprocess.json``, ``runner.py``), plus the weights with ``--with-torch``. Its tag is
``<entry name>:<format>-<first 12 hex of model.onnx's sha256>`` (``-torch`` with the weights), so saving
the same bundle twice reuses the model. The bento is then built with those models and with bento
arguments ``models=<the tags>``, ``backend``, ``format``: the service (``serving.service``) loads a
tag from the model store (the bento's own models in a container) instead of ``$ZOO_HOME``.

``--onnx-only`` (the default for the onnx backend) leaves torch, torchvision, timm, transformers and
the other training packages out of the bento's requirements: the service's ONNX path runs on numpy,
Pillow and onnxruntime (``export.edge``). ``--with-torch`` keeps every pinned dependency and the
weights, so ``--backend torch`` (``bentoml serve medzoo:TAG --arg backend=torch``) works too.

``--models-only`` saves the models and prints their tags: ``bentoml build --arg models=TAG[,TAG]``
with ``bentofile.yaml`` then builds a bento that carries them (the service declares tag-form names
as its models).

``add_arguments`` and ``main`` are what ``zoo`` registers as its ``bento`` command (``python -m
serving.bento`` is the same command on its own); this module imports nothing heavy at module level:
BentoML, torch and the export layer load inside :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from export.formats import FORMATS, SERVABLE
from serving.cli import UsageError

SERVICE = "serving.service:ZooService"
REPO = Path(__file__).resolve().parents[1]  # the build context: serving/, export/ and zoo/ are packed from here
DEFAULT_BENTO = "medzoo"
# What the ONNX path imports at run time (serving/, export.edge, zoo.images, zoo.store); the rest of
# the pinned dependencies are for training, export and the torch backend.
ONNX_ONLY_PACKAGES = ("numpy", "pillow", "onnxruntime", "bentoml", "httptools", "uvloop")
TORCH_PACKAGES = ("torch", "torchvision", "timm", "transformers")
ENTRY_FILES = ("config.json", "config.yaml", "metrics.json", "README.md")
BUNDLE_FILES = ("model.onnx", "export.json", "preprocess.json", "runner.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="NAME", help="zoo names (or folders of built entries / runs)")
    p.add_argument("--format", choices=SERVABLE, default="onnx",
                   help="export format the bento serves: " + "; ".join(f"{n}: {FORMATS[n].summary}" for n in SERVABLE)
                        + " (default onnx)")
    p.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="the bento's default backend (default onnx); torch needs --with-torch")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--onnx-only", dest="onnx_only", action="store_true", default=None,
                   help="requirements without torch, torchvision, timm, transformers (default for --backend onnx)")
    g.add_argument("--with-torch", dest="onnx_only", action="store_false",
                   help="every pinned dependency and the weights, so the torch backend can serve too")
    p.add_argument("--tag", metavar="NAME[:VERSION]", default=DEFAULT_BENTO,
                   help=f"the bento's tag (default {DEFAULT_BENTO}, with a generated version)")
    p.add_argument("--models-only", action="store_true",
                   help="only save the models into BentoML's model store and print their tags, for "
                        "`bentoml build --arg models=TAG[,TAG]`")


# ----------------------------------------------------------------------------------------- requirements


def _dist(requirement: str) -> str:
    """The distribution name of a requirement line (``uvloop==0.23.0; sys_platform != 'win32'`` -> ``uvloop``)."""
    return re.split(r"[\s;=<>!~\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned_dependencies() -> list[str]:
    """The project's pinned runtime dependencies: pyproject.toml's in a checkout, else the installed metadata."""
    pyproject = REPO / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        tomllib = None
    if pyproject.is_file() and tomllib is not None:
        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    from importlib.metadata import requires

    return [r for r in requires("medzoo") or [] if "extra ==" not in r]


def requirements(onnx_only: bool) -> list[str]:
    """The bento's python packages: every pin, or with ``onnx_only`` those the ONNX path imports."""
    deps = pinned_dependencies()
    if not onnx_only:
        return deps
    keep = [d for d in deps if _dist(d) in ONNX_ONLY_PACKAGES]
    missing = set(ONNX_ONLY_PACKAGES) - {_dist(d) for d in keep}
    if missing:
        raise RuntimeError(f"the pinned dependencies lack {', '.join(sorted(missing))}; pin them in pyproject.toml")
    return keep


# ----------------------------------------------------------------------------------------- models


class BentoFailed(ValueError):
    """BentoML could not save a model or build the bento (exit status 1); the message is BentoML's."""


def model_tag(entry_name: str, fmt: str, onnx_sha256: str, with_weights: bool) -> str:
    """``<entry name>:<format>-<sha256[:12]>[-torch]``, checked against BentoML's tag rules."""
    from serving.runtime import is_model_tag

    tag = f"{entry_name}:{fmt}-{onnx_sha256[:12]}" + ("-torch" if with_weights else "")
    if not is_model_tag(tag) or len(entry_name) > 63:
        raise UsageError(f"{entry_name} cannot name a BentoML model (at most 63 lowercase letters, digits, '-', '_' "
                         "and '.')")
    return tag


def save_model(name: str, fmt: str = "onnx", with_weights: bool = False,
               say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> str:
    """Export ``name``'s bundle when needed and save it (entry files, bundle, optionally weights) as a BentoML
    model; returns its tag. An identical model already in the store is reused."""
    import bentoml  # start-up cost

    from serving.runtime import ensure_onnx, entry_folder, is_model_tag

    if is_model_tag(name):
        raise UsageError(f"{name} is a BentoML model tag; give the zoo name it was saved from")
    folder = entry_folder(name)  # unknown names raise UnknownModelError (with the closest names)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{name} is not built; build it with `zoo build {name}`")
    bundle = ensure_onnx(name, say, fmt)
    rec = json.loads((bundle / "export.json").read_text())
    tag = model_tag(rec["model"], fmt, rec["sha256"], with_weights)
    try:
        bentoml.models.get(tag)
        say(f"{tag} is in BentoML's model store already")
        return tag
    except bentoml.exceptions.NotFound:
        pass
    labels = {"project": "medzoo", "format": fmt, "weights": str(with_weights).lower()}
    metadata = {"zoo_name": rec["model"], "format": fmt, "onnx_sha256": rec["sha256"], "opset": rec["opset"],
                "exporter": (rec.get("exporter") or {}).get("used", "legacy"), "dataset": rec["dataset"],
                "test_acc_onnx": rec["accuracy"]["exported"]["acc"], "test_acc_torch": rec["accuracy"]["torch"]["acc"],
                "created": rec["created"]}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as m:
        dst = Path(m.path)
        if with_weights:  # the whole entry (weights, backbone config, card) but its other exports
            shutil.copytree(folder, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("export"))
        else:
            for f in ENTRY_FILES:
                if (folder / f).is_file():
                    shutil.copyfile(folder / f, dst / f)
        (dst / "export" / fmt).mkdir(parents=True)
        for f in BUNDLE_FILES:
            shutil.copyfile(bundle / f, dst / "export" / fmt / f)
    say(f"saved {tag} into BentoML's model store")
    return tag


# ----------------------------------------------------------------------------------------- the bento


def build_bento(tags: list[str], fmt: str = "onnx", backend: str = "onnx", onnx_only: bool = True,
                bento_tag: str = DEFAULT_BENTO):
    """Build the bento that serves the BentoML models ``tags`` (:func:`save_model`); returns it."""
    import bentoml  # start-up cost

    name, _, version = bento_tag.partition(":")
    include = ["serving/**/*.py", "export/**/*.py", "zoo/**/*.py"]
    if not onnx_only:  # as bentofile.yaml: zoo.cli's imports, and `zoo build` inside the container
        include += ["training/**/*.py", "training/configs/**/*.yaml"]
    return bentoml.bentos.build(
        SERVICE, name=name, version=version or None,
        labels={"project": "medzoo", "format": fmt, "backend": backend, "onnx_only": str(onnx_only).lower()},
        description=f"medzoo: HTTP classification and localization of {', '.join(tags)} ({fmt}); the models "
                    "travel with the bento (no ZOO_HOME needed)",
        include=include, exclude=["**/__pycache__"],
        docker={"env": {"BENTOML_DO_NOT_TRACK": "true"}},  # no usage analytics from the container
        python={"packages": requirements(onnx_only), "lock_packages": False},
        models=list(tags), build_ctx=str(REPO),
        args={"models": list(tags), "backend": backend, "format": fmt})


def main(a: argparse.Namespace) -> str:
    """Save the models and build the bento; returns the one-line summary ``zoo`` prints."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage analytics from a medical-imaging server
    onnx_only = (a.backend == "onnx") if a.onnx_only is None else a.onnx_only
    if a.backend == "torch" and onnx_only:
        raise UsageError("--backend torch needs torch in the bento: pass --with-torch instead of --onnx-only")
    if a.backend == "torch" and a.format != "onnx":
        raise UsageError(f"the torch backend serves fp32 only; use --backend onnx for --format {a.format}")
    if not re.fullmatch(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?(:[a-z0-9]([-._a-z0-9]*[a-z0-9])?)?", a.tag):
        raise UsageError(f"--tag {a.tag!r} is not a BentoML tag: NAME or NAME:VERSION, lowercase letters, digits, "
                         "'-', '_' and '.'")
    from bentoml.exceptions import BentoMLException  # start-up cost: BentoML

    try:
        tags = [save_model(n, a.format, with_weights=not onnx_only) for n in a.models]
        if a.models_only:
            return (f"saved {', '.join(tags)}; a bento of them: bentoml build --arg models={','.join(tags)} "
                    f"--arg format={a.format}")
        bento = build_bento(tags, a.format, a.backend, onnx_only, a.tag)
    except BentoMLException as e:
        raise BentoFailed(f"BentoML: {e}") from e
    kind = "onnx-only: no torch in its requirements" if onnx_only else "with torch and the weights"
    return (f"built bento {bento.tag} with {', '.join(tags)} ({a.format}, {kind}); serve it: bentoml serve "
            f"{bento.tag}; make a Docker image: bentoml containerize {bento.tag}")


def _main(argv: list[str] | None = None) -> int:
    """``python -m serving.bento``: 0 when built, 2 for a usage error, 1 for a runtime error (one line each)."""
    from serving.cli import exit_status

    p = argparse.ArgumentParser(prog="python -m serving.bento", description="Build a BentoML bento of zoo models.")
    add_arguments(p)
    a = p.parse_args(argv)
    from zoo.registry import UnknownModelError  # start-up cost: the registry imports torch
    from zoo.store import WeightsCorruptedError

    try:
        summary = main(a)
    except (UnknownModelError, WeightsCorruptedError, ValueError, OSError) as e:  # as `zoo` reports them
        print(f"bento: error: {e}".replace("\n", " "), file=sys.stderr)
        return exit_status(e)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
