"""Model cards of every kind of entry, generated from its ``config.json`` and ``metrics.json`` (never typed in).

A card is the entry's ``README.md`` and, published with ``zoo push``, its Hugging Face Hub repo's
README: Markdown with the Hub's YAML front matter, built with ``huggingface_hub``'s
``ModelCardData`` / ``EvalResult`` (so ``ModelCard.load`` and ``metadata_load`` read it back):

- ``license``: the dataset's licence (the weights inherit it) as the Hub's id, ``CC BY 4.0`` ->
  ``cc-by-4.0``, ``CC BY-NC 4.0`` -> ``cc-by-nc-4.0``; any other text -> ``other`` with
  ``license_name`` / ``license_link``.
- ``datasets``: :data:`HUB_DATASET`, the Hub's mirror of MedMNIST v2, whose configs are the
  MedMNIST flags; ``model-index`` names the flag as the dataset config, and the card text links
  medmnist.com. (The Hub has no official MedMNIST organisation; the mirror is what the Hub links.)
- ``library_name: medzoo`` (the weights load with ``zoo.load("hf-hub:<repo>")``), ``tags``
  (``medical-imaging``, ``medmnist``, the flag, the task, the method, the architecture),
  ``pipeline_tag`` (``image-classification``; ``image-feature-extraction`` for DINO-MX backbones),
  ``base_model`` (the teacher of distilled students and probes, or the backbone a DINO-MX run
  started from, when it is a Hub id), ``metrics`` and ``model-index`` (val/test ACC and AUC, or a
  backbone's kNN and linear-probe figures).

Given the entry's folder, the card also lists parameters and file sizes (weight files, export
bundles under ``export/*/``) and the latency an export receipt measured. :func:`folder_facts`
gives the same figures to ``zoo list --built`` and ``zoo info``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import zoo.store as store
from zoo.registry import ZooEntry

HUB_DATASET = "albertvillanova/medmnist-v2"
LIBRARY = "medzoo"
MEDMNIST_URL = "https://medmnist.com/"
# Weight files that are not part of the model zoo.load builds: the teacher's linear head (kept for
# lineage) and DINO-MX's projection heads (training only). They are hashed and listed like the others.
AUXILIARY = ("teacher_head.safetensors", "backbone/dinomx_heads.safetensors")
_SPLIT_NAMES = {"val": "validation", "test": "test"}  # MedMNIST's split -> the Hub mirror's

_METHOD = {
    "baseline": "student trained alone on the labels (MedAlmighty's baseline, alpha = 1)",
    "medalmighty": "student distilled from a frozen ViT teacher with a linear head (MedAlmighty)",
    "linear": "frozen ViT backbone with a linear head trained on its features (linear probe)",
    "finetune": "ViT backbone fine-tuned end to end with the labels, its head started from the linear probe "
                "(a teacher that can win offline; not the paper's frozen teacher)",
    "ensemble": "an ensemble of supervised students whose logits are averaged (not the paper's method)",
    "camkd": "student distilled from several teachers with confidence-aware weights (CA-MKD, the paper's comparison)",
}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _augmentation(t: dict[str, Any]) -> str:
    if t.get("augment", "none") == "none":
        return "no augmentation"
    ema = f", weights EMA {t['ema']}" if t.get("ema") else ""
    return (f"{t['augment']} augmentation (random crop after {t.get('crop_padding')} px padding, flips "
            f"{t.get('flip')}){ema}")


def _teacher_line(t: dict[str, Any]) -> str:
    what = f"`{t['teacher_backbone']}` (weights sha256 {t['teacher_sha256'][:16]}...)"
    if "pooling" in t:
        what += f", {t['pooling']} features"
    return f"- Teacher: {what} at {t['teacher_input_size']} px ({t.get('teacher_resolution', 'its input size')})."


def _lineage(lin: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Where the model's knowledge came from: teachers, ensemble members, the teacher check, the chosen (t, a)."""
    lines = [_teacher_line(t) for t in lin.get("teachers", [lin] if "teacher_backbone" in lin else [])]
    for m in lin.get("members", []):
        lines.append(f"- Member: {m['source']} (seed {m['seed']}, weights sha256 {m['sha256'][:16]}...).")
    gates = metrics.get("teacher_gate")
    for g in gates if isinstance(gates, list) else [gates] if gates else []:
        t, r = g["teacher_val"], g["reference_val"]
        verdict = "stronger" if g["stronger"] else f"**weaker** (on {', '.join(g['weaker_on'])})"
        lines.append(f"- Teacher check: validation ACC {_f(t['acc'])} / AUC {_f(t['auc'])} against {g['reference']} "
                     f"{_f(r['acc'])} / {_f(r['auc'])}: {verdict}.")
    if "distill_chosen" in lin:
        c = lin["distill_chosen"]
        tried = ", ".join(f"(t {x['temperature']:g}, a {x['alpha']:g}): val AUC {_f(x['val']['auc'])}"
                          for x in metrics.get("search", {}).get("grid", []))
        lines.append(f"- Distillation temperature {c['temperature']:g} and alpha {c['alpha']:g}, chosen by validation "
                     f"AUC over {tried}.")
    return lines


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


# ----------------------------------------------------------------------------------------- folder facts


def safetensors_parameters(path: Path) -> int | None:
    """Number of values in a safetensors file, from its header alone (no torch); None if unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                return None
            header = json.loads(f.read(n))
        return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def receipt_latency(receipt: dict[str, Any]) -> dict[str, Any] | None:
    """The latency an export receipt measured, as ``{"ms": per image, ...}``, or None if it has none.

    Reads ``export.json``'s ``latency``: a number of milliseconds per image, or an object with ``ms``
    (or ``p50_ms`` / ``median_ms``) and optionally ``batch``, ``threads``, ``device``, ``runtime``.
    """
    lat = receipt.get("latency")
    if isinstance(lat, (int, float)) and not isinstance(lat, bool):
        return {"ms": float(lat)}
    if not isinstance(lat, dict):
        return None
    ms = next((lat[k] for k in ("ms", "p50_ms", "median_ms") if isinstance(lat.get(k), (int, float))), None)
    if ms is None:
        return None
    return {"ms": float(ms), **{k: lat[k] for k in ("batch", "threads", "device", "runtime") if k in lat}}


def folder_facts(folder: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sizes and speed of a built entry folder, read from its files (no torch, nothing hashed).

    Returns ``files`` (every file: path, bytes, sha256 where config.json records one), ``weights``
    (weight files: path, bytes, parameters, and whether the model uses it), ``parameters`` and
    ``weights_bytes`` (the model's weight files, :data:`AUXILIARY` left out), and ``exports``
    (``export/<format>/`` bundles: format, bytes, files, latency from their receipt), the fastest
    measured as ``latency`` (or None).
    """
    folder = Path(folder)
    recorded = (config or {}).get("sha256", {}) if isinstance(config, dict) else {}
    files = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        rel = p.relative_to(folder).as_posix()
        files.append({"path": rel, "bytes": p.stat().st_size, **({"sha256": recorded[rel]} if rel in recorded else {})})
    weights = []
    for f in files:
        if f["path"].endswith(".safetensors") and not f["path"].startswith("export/"):
            weights.append({"path": f["path"], "bytes": f["bytes"],
                            "parameters": safetensors_parameters(folder / f["path"]),
                            "model": f["path"] not in AUXILIARY})
    used = [w for w in weights if w["model"]]
    params = None if any(w["parameters"] is None for w in used) else sum(w["parameters"] for w in used)
    exports = []
    for d in sorted(p for p in (folder / "export").glob("*") if p.is_dir()):
        bundle = [f for f in files if f["path"].startswith(f"export/{d.name}/")]
        rec = store.read_json_object(d / "export.json")
        acc = rec.get("accuracy") if isinstance(rec.get("accuracy"), dict) else {}
        exports.append({"format": str(rec.get("format", d.name)), "dir": f"export/{d.name}",
                        "bytes": sum(f["bytes"] for f in bundle), "files": len(bundle),
                        "latency": receipt_latency(rec), "accuracy": acc.get("exported")})
    timed = [e for e in exports if e["latency"]]
    fastest = min(timed, key=lambda e: e["latency"]["ms"]) if timed else None
    return {"files": files, "weights": weights, "parameters": params,
            "weights_bytes": sum(w["bytes"] for w in used), "exports": exports,
            "latency": {"format": fastest["format"], **fastest["latency"]} if fastest else None}


# ----------------------------------------------------------------------------------------- front matter


def hub_license(text: str) -> dict[str, str]:
    """The Hub's licence fields for a dataset licence text: ``{"license": "cc-by-4.0"}`` for ``CC BY 4.0``."""
    m = re.fullmatch(r"\s*CC[ -]BY((?:[ -](?:NC|SA|ND))*)[ -](\d\.\d)\s*", text or "", flags=re.I)
    if m:
        parts = [p.lower() for p in re.split(r"[ -]", m.group(1)) if p]
        return {"license": "-".join(["cc", "by", *parts, m.group(2)])}
    if re.fullmatch(r"\s*CC0[ -]1\.0\s*", text or "", flags=re.I):
        return {"license": "cc0-1.0"}
    slug = re.sub(r"[^a-z0-9.]+", "-", (text or "unknown").lower()).strip("-") or "unknown"
    return {"license": "other", "license_name": slug, "license_link": MEDMNIST_URL}


def is_hub_id(ref: str | None) -> bool:
    """``org/name`` as the Hub spells repo ids, and not a folder here (``facebook/dinov2-base``: yes; a path: no)."""
    if not ref or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", ref):
        return False
    return not Path(ref).exists()


def base_model(entry: ZooEntry, config: dict[str, Any]) -> str | None:
    """The Hub model this one derives from: the teacher (students, probes) or a DINO-MX run's starting backbone."""
    if entry.method == "dinomx":
        ref = (config.get("lineage") or {}).get("backbone_source")
    else:
        ref = entry.teacher
    return ref if is_hub_id(ref) else None


def _task_tag(task: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")


def card_data(entry: ZooEntry, config: dict[str, Any], metrics: dict[str, Any]):
    """The Hub metadata of an entry, as ``huggingface_hub.ModelCardData`` (with ``model-index``)."""
    # function-level import: huggingface_hub is for writing cards; `zoo list --built` reads folder facts without it
    from huggingface_hub import EvalResult, ModelCardData

    backbone = entry.method == "dinomx"
    pipeline = "image-feature-extraction" if backbone else "image-classification"
    tags = ["medical-imaging", "medmnist", entry.dataset, _task_tag(entry.task), entry.method, entry.arch]
    if entry.method in ("medalmighty", "camkd"):
        tags.append("knowledge-distillation")
    if backbone:
        tags += ["dino", "self-supervised"]
    results = []

    def add(flag: str, split: str, kind: str, name: str, value: float | None) -> None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        results.append(EvalResult(
            task_type=pipeline, dataset_type=HUB_DATASET, dataset_name=f"MedMNIST v2 {flag}", dataset_config=flag,
            dataset_split=_SPLIT_NAMES.get(split, split), metric_type=kind, metric_value=float(value),
            metric_name=name))

    if backbone:
        for flag, r in metrics.get("knn", {}).items():
            lin = metrics.get("linear", {}).get(flag, {})
            for s in ("val", "test"):
                add(flag, s, "accuracy", f"kNN {s} ACC", r.get(s, {}).get("acc"))
                add(flag, s, "roc_auc", f"kNN {s} AUC", r.get(s, {}).get("auc"))
                add(flag, s, "accuracy", f"linear {s} ACC", lin.get(s, {}).get("acc"))
                add(flag, s, "roc_auc", f"linear {s} AUC", lin.get(s, {}).get("auc"))
    else:
        for s in ("val", "test"):
            add(entry.dataset, s, "accuracy", f"{s} ACC", metrics.get(s, {}).get("acc"))
            add(entry.dataset, s, "roc_auc", f"{s} AUC", metrics.get(s, {}).get("auc"))
    return ModelCardData(
        **hub_license(entry.license), datasets=[HUB_DATASET], library_name=LIBRARY, tags=tags,
        base_model=base_model(entry, config), pipeline_tag=pipeline, metrics=["accuracy", "roc_auc"],
        model_name=entry.name if results else None, eval_results=results or None)


# ----------------------------------------------------------------------------------------- cards


def render_card(entry: ZooEntry, config: dict[str, Any], metrics: dict[str, Any], folder: Path | None = None,
                repo_id: str | None = None) -> str:
    """The model card (``README.md``) of a built entry or run, from its ``config.json`` and ``metrics.json``.

    Args:
        folder: the entry's folder, for parameters, file sizes, export bundles and latency (omitted without it).
        repo_id: the Hub repo it is published as (``zoo push``): the card shows ``zoo.load("hf-hub:<repo_id>")``.

    The card starts with the Hub's YAML front matter (:func:`card_data`); ``huggingface_hub.ModelCard``
    reads it back (``ModelCard(text).data``, ``.text`` for the Markdown body).
    """
    facts = folder_facts(folder, config) if folder is not None else None
    if entry.method == "dinomx":
        body = _backbone_card(entry, config, metrics, facts, repo_id)
    else:
        body = _classifier_card(entry, config, metrics, facts, repo_id)
    return f"---\n{card_data(entry, config, metrics).to_yaml()}\n---\n{body}"


def _load_line(entry: ZooEntry, repo_id: str | None) -> str:
    return f'model = zoo.load("hf-hub:{repo_id}")   # or zoo.load("{entry.name}") once built or fetched' if repo_id \
        else f'model = zoo.load("{entry.name}")'


def _size_lines(facts: dict[str, Any] | None) -> list[str]:
    """The "Size and speed" section: parameters, weight files, export bundles and measured latency."""
    if facts is None:
        return []
    used = [w for w in facts["weights"] if w["model"]]
    params = "?" if facts["parameters"] is None else f"{facts['parameters']:,}"
    names = ", ".join("`" + w["path"] + "`" for w in used)
    lines = ["", "## Size and speed", "", f"- Parameters: {params} in {names}; weights {_mb(facts['weights_bytes'])}."]
    for w in facts["weights"]:
        if not w["model"]:
            n = "?" if w["parameters"] is None else f"{w['parameters']:,}"
            lines.append(f"- Also stored: `{w['path']}` ({n} parameters, {_mb(w['bytes'])}), not used by `zoo.load`.")
    if facts["exports"]:
        lines += ["", "| export | files | size | test ACC | latency |", "|---|---|---|---|---|"]
        for e in facts["exports"]:
            acc = (e.get("accuracy") or {}).get("acc")
            lat = e["latency"]
            where = ", ".join(f"{k} {lat[k]}" for k in ("batch", "threads", "device", "runtime") if lat and k in lat)
            lat_s = f"{lat['ms']:.3g} ms/image" + (f" ({where})" if where else "") if lat else "not measured"
            lines.append(f"| `{e['dir']}/` | {e['files']} | {_mb(e['bytes'])} | {_f(acc)} | {lat_s} |")
    return lines


def _file_lines(config: dict[str, Any], facts: dict[str, Any] | None) -> list[str]:
    sizes = {f["path"]: f["bytes"] for f in facts["files"]} if facts else {}
    return [f"- `{k}`" + (f" ({_mb(sizes[k])})" if k in sizes else "") + f" sha256 `{v}`"
            for k, v in config["sha256"].items()]


def _classifier_card(entry: ZooEntry, config: dict[str, Any], metrics: dict[str, Any],
                     facts: dict[str, Any] | None, repo_id: str | None) -> str:
    cfg = config["config"]
    t = cfg["train"] if entry.method != "linear" else cfg["probe"]
    lines = [
        f"# {entry.name}",
        "",
        f"{entry.arch} on **{entry.dataset}** ({entry.task}, {len(entry.labels)} labels): {_METHOD[entry.method]}.",
        "",
        "## Use",
        "",
        "```python",
        "import zoo",
        _load_line(entry, repo_id),
        "pred = model.predict(images)   # PIL images, uint8 arrays or tensors",
        "pred.labels, pred.probs",
        "```",
        "",
        "## Measured (MedMNIST v2 metrics, this build)",
        "",
        "| split | ACC | AUC |",
        "|---|---|---|",
        f"| val | {_f(metrics['val']['acc'])} | {_f(metrics['val']['auc'])} |",
        f"| test | {_f(metrics['test']['acc'])} | {_f(metrics['test']['auc'])} |",
        "",
        f"Checkpoint chosen by validation AUC: epoch {metrics['best_epoch']} of {metrics['epochs']}. "
        f"Seed {metrics['seed']}; wall time {metrics['wall_time_s']:.1f} s "
        f"(training {metrics['train_time_s']:.1f} s).",
    ]
    if "teacher" in metrics:
        for tm in metrics["teacher"] if isinstance(metrics["teacher"], list) else [metrics["teacher"]]:
            lines += ["", f"Teacher on the same splits: val ACC {_f(tm['val']['acc'])} / AUC {_f(tm['val']['auc'])}, "
                          f"test ACC {_f(tm['test']['acc'])} / AUC {_f(tm['test']['auc'])}."]
    lines += [
        "",
        "## Input",
        "",
        f"- {entry.in_chans} channel(s), {entry.input_size} x {entry.input_size} px ({entry.resize} resize), "
        f"normalised with mean {list(entry.mean)} and std {list(entry.std)}.",
        f"- Labels: {', '.join(f'{i}: {n}' for i, n in enumerate(entry.labels))}.",
        *_size_lines(facts),
        "",
        "## Recipe",
        "",
        f"- Recipe `{entry.recipe}` with overrides {list(entry.overrides)}; "
        "the fully resolved config is in `config.json` / `config.yaml`.",
        f"- Data: MedMNIST `{cfg['data']['dataset']}` at {cfg['data']['size']} px ({MEDMNIST_URL}), "
        f"{_augmentation(t)}.",
        f"- Optimiser {t.get('optimizer', 'adam')} lr {t['lr']}, batch {t['batch_size']}, {metrics['epochs']} epochs"
        + (f", schedule {t['schedule']}, amp {t['amp']}." if entry.method != "linear" else "."),
    ]
    if entry.method in ("medalmighty", "camkd"):
        d = cfg["distill"]
        lines.append(f"- Loss: {d['alpha']} * task + (1 - {d['alpha']}) * {d['temperature']}^2 * "
                     f"KL(teacher || student) at temperature {d['temperature']}"
                     + (f", with CA-MKD's confidence weights and feature term (beta {d['feature_weight']})."
                        if entry.method == "camkd" else "."))
    lin = config.get("lineage") or {}
    if lin:
        lines += ["", "## Lineage", "", *_lineage(lin, metrics)]
    lines += [
        "",
        "## Files",
        "",
        *_file_lines(config, facts),
        "",
        "## Licence",
        "",
        f"Trained on MedMNIST {entry.dataset}, licensed {entry.license}; these weights inherit its terms. "
        "Research use only: not a medical device.",
        "",
        f"_Generated by `zoo build` on {config['created']}._",
        "",
    ]
    return "\n".join(lines)


def _backbone_card(entry: ZooEntry, config: dict[str, Any], metrics: dict[str, Any],
                   facts: dict[str, Any] | None, repo_id: str | None) -> str:
    cfg = config["config"]
    rep = metrics.get("report", {})
    losses = [k for k in ("dino", "ibot", "koleo", "gram") if float(cfg[k]["loss_weight"]) > 0]
    where = f"hf-hub:{repo_id}" if repo_id else entry.name
    lines = [
        f"# {entry.name}",
        "",
        f"A `{entry.arch}` ViT backbone pretrained with DINO-MX ({cfg['method']} preset: {', '.join(losses)}) "
        f"on the training split(s) of {', '.join(config['lineage']['datasets'])}, without labels.",
        "",
        "## Use",
        "",
        "```python",
        "import zoo",
        f"backbone, preprocess = zoo.load_backbone('{where}')",
        "from transformers import AutoModel",
        f"model = AutoModel.from_pretrained('<ZOO_HOME>/{entry.name}/backbone')   # no project code needed",
        "```",
        "",
        f"Input: {entry.in_chans} channel(s), {entry.input_size} px, mean {list(entry.mean)}, std {list(entry.std)}.",
        f"As a MedAlmighty teacher: `zoo build medalmighty-resnet18-{entry.dataset}.dinomx-28`.",
        "",
        "## Frozen-feature evaluation (CLS token)",
        "",
        "| dataset | split | kNN ACC | kNN AUC | linear ACC | linear AUC |",
        "|---|---|---|---|---|---|",
    ]
    for flag, r in metrics.get("knn", {}).items():
        lin = metrics.get("linear", {}).get(flag, {})
        for s in ("val", "test"):
            lines.append(f"| {flag} | {s} | {_f(r[s]['acc'])} | {_f(r[s]['auc'])} | "
                         f"{_f(lin.get(s, {}).get('acc'))} | {_f(lin.get(s, {}).get('auc'))} |")
    p = rep.get("parameters", {})
    lines += [
        "",
        f"kNN: k = {metrics.get('eval', {}).get('k')}, cosine, weighted by exp(sim / "
        f"{metrics.get('eval', {}).get('temperature')}). Linear: a linear layer on standardised CLS features.",
        *_size_lines(facts),
        "",
        "## Training",
        "",
        f"- steps: {rep.get('steps')}, global batch {cfg['optim']['batch_size']}, "
        f"{cfg['crops']['local_number']} local crops, lr {cfg['optim']['lr']}, seed {metrics.get('seed')}",
        f"- {rep.get('images_per_s')} images/s on {rep.get('device')} ({rep.get('strategy')}, world size "
        f"{rep.get('world_size')}); peak memory {rep.get('peak_memory_mb')} MB; "
        f"wall time {metrics.get('wall_time_s')} s",
        f"- parameters: {p.get('backbone_total')} in the backbone ({p.get('backbone_trainable')} trained)",
        "",
        "## Files",
        "",
        *_file_lines(config, facts),
        "",
        f"Licence: the weights inherit the dataset licence ({entry.license}); MedMNIST: {MEDMNIST_URL}. "
        "Research use only: not a medical device.",
    ]
    return "\n".join(lines) + "\n"
