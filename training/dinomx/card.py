"""Model cards for DINO-MX backbones, generated from ``config.json`` and ``metrics.json`` (never typed in)."""

from __future__ import annotations

from typing import Any

from zoo.registry import ZooEntry


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def render_card(entry: ZooEntry, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    cfg = config["config"]
    rep = metrics.get("report", {})
    losses = [k for k in ("dino", "ibot", "koleo", "gram") if float(cfg[k]["loss_weight"]) > 0]
    lines = [
        f"# {entry.name}",
        "",
        f"A `{entry.arch}` ViT backbone pretrained with DINO-MX ({cfg['method']} preset: {', '.join(losses)}) "
        f"on the training split(s) of {', '.join(config['lineage']['datasets'])}, without labels.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel",
        f"model = AutoModel.from_pretrained('<ZOO_HOME>/{entry.name}/backbone')   # no project code needed",
        "```",
        "",
        f"Input: {entry.in_chans} channel(s), {entry.input_size} px, mean {list(entry.mean)}, std {list(entry.std)}.",
        f"As a MedAlmighty teacher: `zoo build medalmighty-resnet18-<dataset> teacher.backbone={entry.name}`.",
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
        f"Licence: the weights inherit the dataset licence ({entry.license}).",
    ]
    return "\n".join(lines) + "\n"
