"""Regenerate the README's results section from ``benchmarks/results/*.json`` (figures never typed in).

    python -m benchmarks.report          # rewrites the block between the results markers in README.md
    python -m benchmarks.report --demo-report $ZOO_HOME/demo/report.md --demo-note "..."  # and the demo's times
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def baseline_table(p: Path = RESULTS / "baseline_resnet18_28.json") -> list[str]:
    if not p.is_file():
        return ["_Not run yet: `python -m benchmarks.baseline_resnet18_28`._"]
    r = json.loads(p.read_text())
    env = r["env"]
    out = [f"Baseline ResNet-18 at 28 px on {env['cpu_threads']} CPU threads, next to {r['reference']} "
           "(100 epochs). Checkpoint chosen on validation AUC; the last column reads the per-epoch test log.", "",
           "| dataset | recipe | test ACC | published ACC | Δ ACC (pt) | test AUC | published AUC | epochs "
           "| train time (s) | time to within 1 pt of published ACC (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        recipe = " ".join([f"`{x['config']}`", *x["overrides"]]) if "config" in x else "?"
        tta = (f"{x['time_to_within_1pt_s']:.0f} (epoch {x['epoch_within_1pt']})"
               if x["time_to_within_1pt_s"] is not None else "not reached")
        out.append(f"| {x['dataset']} | {recipe} | {x['test_acc']:.3f} | {x['ref_acc']:.3f} | "
                   f"{x['delta_acc_pt']:+.1f} | {x['test_auc']:.3f} | {x['ref_auc']:.3f} | {x['epochs']} | "
                   f"{x['train_time_s']:.0f} | {tta} |")
    return out


def _distill() -> list[str]:
    p = RESULTS / "distill_overhead.json"
    if not p.is_file():
        return ["_Not run yet: `python -m benchmarks.distill_overhead`._"]
    r = json.loads(p.read_text())
    return [f"Distillation cost ({r['arch']} on {r['dataset']}, teacher {r['teacher']}): median epoch "
            f"{r['median_distill_epoch_s']:.2f} s distilled vs {r['median_plain_epoch_s']:.2f} s plain, "
            f"ratio **{r['ratio']:.3f}** (target ≤ {r['target']}); the teacher's features and logits are "
            f"computed once and cached ({r['first_run_with_teacher_cache_fill_s']:.0f} s for the first run)."]


def _export() -> list[str]:
    p = RESULTS / "export_latency.md"  # written by benchmarks/export_latency.py
    if not p.is_file():
        return ["_Not run yet: `python -m benchmarks.export_latency`._"]
    return ["Export (`benchmarks/export_latency.py`): batch-1 CPU latency side by side, and test accuracy "
            "through onnxruntime.", "", *p.read_text().strip().splitlines()]


def _md(name: str, intro: str, command: str = "") -> list[str]:
    """A results table written as ``results/<name>.md`` by ``command`` (default ``benchmarks/<name>.py``)."""
    p = RESULTS / f"{name}.md"
    command = command or f"benchmarks/{name}.py"
    if not p.is_file():
        return [f"_Not run yet: `python {command}`._"]
    return [f"{intro} (`{command}`):", "", *p.read_text().strip().splitlines()]


def render() -> str:
    parts = [baseline_table(),
             _md("medalmighty_table2", "MedAlmighty Table 2 on our data: students, teachers and distilled students "
                 "over 3 seeds", "benchmarks/medalmighty_table2.py report"),
             _md("medalmighty_table4", "MedAlmighty Table 4 on our data: the (t, a) grid",
                 "benchmarks/medalmighty_table2.py report"),
             _md("medalmighty_table3", "MedAlmighty Table 3 on our models: parameters, FLOPs, file size per export "
                 "format"),
             _distill(), _export(),
             _md("dinomx_knn", "DINO-MX features against random init and a published ImageNet DINO ViT-B/16"),
             _md("dinomx_strategies", "Full fine-tuning, LoRA and freezing of the same backbone"),
             _md("dinomx_small_budget", "DINO-MX on a small budget: the shipped preset against DINO's defaults"),
             _md("dinomx_vs_lightly", "A DINO-MX training step next to lightly's DINO"),
             _md("dinomx_pointing", "Label-guided crops and attention pointing accuracy on a synthetic benchmark"),
             _md("serve_load", "HTTP serving under load"),
             _md("serve_load_large", "HTTP serving, large-image phase (decoded-pixel budget)",
                 "benchmarks/serve_load.py --large-only --out benchmarks/results/serve_load_large"),
             _md("serve_load_int8", "HTTP serving under load, INT8 bundle",
                 "benchmarks/serve_load.py --precision int8 --out benchmarks/results/serve_load_int8")]
    out = [START, ""]
    for part in parts:
        out += [*part, ""]
    return "\n".join([*out, END])


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def finding_small_budget() -> str:
    r = _load("dinomx_small_budget")
    if r is None:
        return "not measured yet (`python -m benchmarks.dinomx_small_budget`)."
    parts, by = [], {}
    for x in r["rows"]:
        warned = f" (warned at step {x['first_warning_step']})" if x["first_warning_step"] else ""
        state = f"collapsed{warned}" if x["collapsed"] else "alive"
        parts.append(f"{x['dataset']}, {x['setting']}: DINO loss {x['dino_final']:.2f} against ln K = "
                     f"{x['ln_k']:.2f}, {state}, kNN test ACC {x['knn_test_acc']:.3f} (majority class "
                     f"{x['majority_rate']:.3f})")
        by.setdefault(x["dataset"], {})[x["setting"]] = x
    out = "measured on data the preset was not tuned on, " + "; ".join(parts) + "."
    for flag, rows in by.items():
        if {"preset", "dino-defaults"} <= set(rows):
            d = 100 * (rows["preset"]["knn_test_acc"] - rows["dino-defaults"]["knn_test_acc"])
            out += (f" On {flag} the live objective's kNN accuracy is {d:+.1f} pt against the collapsed run's: "
                    + ("at this budget a live objective does not yet give better features than a collapsed one, "
                       "whose kNN reads the random init's features." if d <= 0.5 else "a live objective learns."))
    return out + " (`benchmarks/dinomx_small_budget.py`)."


def finding_speed() -> str:
    r = _load("dinomx_vs_lightly")
    if r is None:
        return "not measured yet (`python -m benchmarks.dinomx_vs_lightly`)."
    parts, met, missed = [], [], []
    for x in r.get("runs", [r]):
        t = x.get("target", {})
        (met if t.get("met") else missed).append(x["autocast_dtype"])
        part = (f"{x['autocast_dtype']}: {t['wall']:.2f}x lightly's DINO step in wall-clock images/s "
                f"({t['cpu']:.2f}x per CPU-second; {t['best_side']}")
        a = t.get("autocast_only") or {}
        if a.get("best_side") and a["best_side"] != t["best_side"]:
            part += (f"; with lightly's autocast, no bf16 stream, {a['wall']:.2f}x wall and {a['cpu']:.2f}x per "
                     f"CPU-second, {a['best_side']}")
        parts.append(part + ")")
    target = r.get("target_speed_vs_lightly")
    verdict = "; ".join(([f"met at {', '.join(met)}"] if met else []) + ([f"not met at {', '.join(missed)}"]
                                                                         if missed else []))
    return ("measured side by side in one run per precision, " + "; ".join(parts)
            + (f"; the target of {target:g}x is {verdict}" if target else "") + " (`benchmarks/dinomx_vs_lightly.py`).")


def finding_pointing() -> str:
    r = _load("dinomx_pointing")
    if r is None or "conclusion" not in r:
        return "Not measured yet (`python -m benchmarks.dinomx_pointing`)."
    live = [x for x in r["seeds"] if x["alive"]]
    out = "What was found: " + r["conclusion"]
    if live:  # how far the branched steps moved the model: an effect needs the arms to diverge
        dloss = sum(abs(x["with"]["final"]["dino"] - x["without"]["final"]["dino"]) for x in live) / len(live)
        moved = sum(x["without"]["pointing"] - x["warmup"]["pointing"] for x in live) / len(live)
        s = r["summary_live"]
        out += (f" Over the {r['budget']['steps'] - r['budget']['warmup_steps']} branched steps the arms' final "
                f"DINO losses differ by {dloss:.3f} on average and pointing moves {moved:+.3f} from the warm-up; "
                f"trained pointing is {s['without']['pointing']['mean']:.3f} against chance "
                f"{r['chance']['cell_centre_share']:.3f}, the random init {s['random_init']['pointing']['mean']:.3f} "
                f"and the contrast baseline {r['contrast_baseline']['pointing']:.3f}.")
    return out + " (`benchmarks/dinomx_pointing.py`)."


def finding_distill() -> str:
    """Where distillation helps most in Table 2 (3 seeds), and what it does on the demo's dataset, and why."""
    from zoo.demo import DATASET

    r = _load("medalmighty_table2")
    goal = {f: g for f, g in (r or {}).get("goal", {}).items() if g.get("gain_pt") is not None}
    if not goal:
        return "Table 2 has no distilled student over 3 seeds yet (`python -m benchmarks.medalmighty_table2`)."

    def pair(f: str, g: dict) -> str:
        n = r["archs"]["resnet18"][f]["methods"][g["best_distilled"]]["acc"]["n"]
        return (f"`{g['best_distilled']}` {g['distilled_acc']:.3f} against its plain twin `{g['against']}` "
                f"{g['against_acc']:.3f} ({g['gain_pt']:+.2f} pt ACC, {g['auc_gain_pt']:+.2f} pt AUC, mean over "
                f"{n} seeds)")

    best = max(goal, key=lambda f: goal[f]["gain_pt"])
    out = f"In Table 2, distillation helps most on {best}: {pair(best, goal[best])}."
    g = goal.get(DATASET)
    if g is None:
        return out + f" The demo's {DATASET} has no 3-seed distilled run yet."
    if g["met"]:
        return out + ("" if DATASET == best else f" On the demo's {DATASET} it helps too: {pair(DATASET, g)}.")
    m = r["archs"]["resnet18"][DATASET]["methods"][g["best_distilled"]]
    ci = ((m.get("paired") or {}).get("acc") or {})
    lo, hi = (ci.get("bootstrap95") or ci.get("ci95") or [None, None])
    if m.get("teacher_check") == "weaker":
        why = "its teacher is weaker than the plain student on validation, and a weaker teacher cannot help"
    elif lo is not None and lo <= 0 <= hi:
        why = (f"its teacher is stronger on validation, and the 95 % interval of the difference, [{100 * lo:+.2f}, "
               f"{100 * hi:+.2f}] pt, includes zero: no measurable gain or loss at 3 seeds")
    else:
        why = "its teacher is stronger on validation, yet the students lose to the plain twin"
    return out + f" On the demo's {DATASET} it does not help: {pair(DATASET, g)}; {why}."


def demo_times(report_md: Path) -> dict[str, float]:
    """Stage -> seconds from the "## Time" section of a demo report (``$ZOO_HOME/demo/report.md``)."""
    text = report_md.read_text()
    if "## Time" not in text:
        raise ValueError(f"{report_md} has no '## Time' section: is it the report of a finished `zoo demo`?")
    times = {m[1]: float(m[2]) for m in re.finditer(r"^- (\w+): ([\d.]+) s$", text.split("## Time", 1)[1], re.M)}
    if "total" not in times:
        raise ValueError(f"{report_md}: its '## Time' section has no total; the demo did not finish")
    return times


def record_demo(report_md: Path, note: str) -> Path:
    """Keep a finished demo's stage times (and how it was run) as ``results/demo_times.json``."""
    from zoo.store import write_json_atomic

    out = RESULTS / "demo_times.json"
    write_json_atomic(out, {"times_s": demo_times(report_md), "note": note})
    return out


def finding_demo_time() -> str:
    r = _load("demo_times")
    if r is None:
        return "not timed yet (`python -m benchmarks.report --demo-report $ZOO_HOME/demo/report.md`)."
    t = {k: v / 60 for k, v in r["times_s"].items()}
    stages = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
    return f"{r['note']}: {t['total']:.0f} min ({stages} min)."


# Sentences inside the README's prose, between <!-- finding:NAME --> and <!-- /finding:NAME -->.
FINDINGS = {"distill": finding_distill, "demo-time": finding_demo_time, "small-budget": finding_small_budget,
            "speed": finding_speed, "pointing": finding_pointing}


def fill_findings(text: str) -> str:
    for name, make in FINDINGS.items():
        start, end = f"<!-- finding:{name} -->", f"<!-- /finding:{name} -->"
        if start not in text or end not in text:
            sys.exit(f"README.md lacks the {start} / {end} markers")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + make() + end + tail
    return text


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-report", type=Path, help="record this finished demo report's stage times first")
    ap.add_argument("--demo-note", default="Measured from a fresh clone on the 2-core build machine",
                    help="how that demo was run (machine, load), written before its times")
    a = ap.parse_args()
    if a.demo_report:
        try:
            print(f"wrote {record_demo(a.demo_report, a.demo_note)}")
        except (OSError, ValueError) as e:
            sys.exit(f"--demo-report: {e}")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(fill_findings(head + render() + tail))
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
