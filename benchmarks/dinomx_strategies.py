"""LoRA and freezing in DINO-MX: trainable parameters, peak memory and step time of full, LoRA and frozen runs.

The same backbone (``--backbone``, default ``vit-tiny-p4``: 12 blocks, width 192) is pretrained for a
few steps three times with one config (``dinomx/default.yaml``: DINO + iBOT + KoLeo), changing only
the strategy:

- ``full``: every backbone parameter trains;
- ``lora``: ``strategy.lora.enabled=true`` (peft LoRA, rank ``--lora-r``, on the attention q/v
  projections; the rest of the backbone is frozen);
- ``freeze``: ``strategy.freeze.blocks=N strategy.freeze.patch_embed=true`` (the patch embedding and
  the first N blocks frozen).

The DINO and iBOT heads train in all three runs, so trainable parameters are reported for the
backbone alone (what the strategy changes) and for the whole student (backbone + heads). Each run is
its own subprocess, so its peak memory (``peak_memory_mb``: the process's max resident set size on
CPU, the CUDA allocator peak on GPUs) belongs to that run alone; every worker imports the same
modules (peft included) before it measures its starting RSS, which is reported too. Step time (wall
clock, and this process's CPU time) is the median over the steps after the first.

    python -m benchmarks.dinomx_strategies
    python -m benchmarks.dinomx_strategies --backbone /path/to/hf_dir --freeze-blocks 6 --steps 8

Writes ``benchmarks/results/dinomx_strategies.{json,md}``; checks backbone trainable parameters
full / LoRA >= 10 (``--min-lora-ratio``) and exits 1 when that fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.host import host

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dinomx_strategies"
STRATEGIES = ("full", "lora", "freeze")
MARKER = "DINOMX_STRATEGY_RESULT "


def strategy_overrides(strategy: str, freeze_blocks: int, lora_r: int) -> list[str]:
    """The config changes that make each strategy; ``full`` changes nothing."""
    if strategy == "full":
        return []
    if strategy == "lora":
        return ["strategy.lora.enabled=true", f"strategy.lora.r={lora_r}", f"strategy.lora.alpha={2 * lora_r}"]
    if strategy == "freeze":
        return [f"strategy.freeze.blocks={freeze_blocks}", "strategy.freeze.patch_embed=true"]
    raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One strategy in this process: build, train ``a.steps`` steps, report parameters, memory, time."""
    import peft  # noqa: F401  (imported by every worker, so the starting RSS is comparable)
    import torch

    from training import distributed as D
    from training.config import load_config
    from training.dinomx.data import PretrainData
    from training.dinomx.model import peak_memory_mb
    from training.dinomx.recipe import Pretraining

    torch.set_num_threads(a.threads)
    images = load_images(a.data, a.images, a.seed)
    start_mb = peak_memory_mb(torch.device("cpu"))
    cfg = load_config(f"dinomx/{a.preset}.yaml", [
        f"model.backbone={a.backbone}", f"optim.batch_size={a.batch}", f"optim.steps={a.steps}", "optim.amp=none",
        f"seed={a.seed}", "log.progress=false", "checkpoint.every=0",
        *strategy_overrides(a.worker, a.freeze_blocks, a.lora_r), *a.overrides])
    pt = Pretraining(cfg, PretrainData(images))
    if pt.env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pt.env.device)
    pt.runner.module.train()
    times, cpu_times, losses = [], [], []

    def record(done: int, out: dict[str, torch.Tensor], grad_norm: float) -> None:
        losses.append(D.average(out, pt.env)["loss"])  # the global-batch loss of the step

    for s in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        # One step of the shared loop (no progress bar, history or checkpoint): step s, then stop.
        pt.loop.run(pt.task, pt.state, images_per_step=pt.task.batch, stop_after=s + 1, on_step=record)
        if pt.env.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        # CPU time leaves out the time other processes held the cores (steadier on a shared CPU).
        cpu_times.append(time.process_time() - c0)
    timed = times[1:] or times  # the first step pays one-off allocation and kernel selection
    cpu_timed = cpu_times[1:] or cpu_times
    p = pt.params
    return {"strategy": a.worker, "overrides": strategy_overrides(a.worker, a.freeze_blocks, a.lora_r),
            "backbone_trainable": int(p["backbone_trainable"]), "backbone_total": int(p["backbone_total"]),
            "student_trainable": int(p["trainable"]), "student_total": int(p["total"]),
            "heads_trainable": int(p["trainable"] - p["backbone_trainable"]),
            "peak_memory_mb": round(peak_memory_mb(pt.env.device), 1), "start_rss_mb": round(start_mb, 1),
            "peak_above_start_mb": round(peak_memory_mb(pt.env.device) - start_mb, 1),
            "median_step_s": round(statistics.median(timed), 4), "step_times_s": [round(t, 4) for t in times],
            "median_step_cpu_s": None if pt.env.device.type == "cuda" else round(statistics.median(cpu_timed), 4),
            "losses": [round(v, 4) for v in losses], "device": str(pt.env.device),
            "losses_on": [k for k in ("dino", "ibot", "koleo", "gram") if float(cfg[k]["loss_weight"]) > 0]}


def load_images(data: str, n: int, seed: int):
    """(n, C, 28, 28) uint8: a MedMNIST flag's train split or ``random`` (parameters and memory ignore pixels)."""
    import torch

    if data == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8)
    from zoo.data import load_split

    return load_split(data, "train", size=28, download=False).images[:n].contiguous()


def run_strategy(strategy: str, a: argparse.Namespace) -> dict[str, Any]:
    """Run one strategy in a fresh interpreter and read back its result line."""
    cmd = [sys.executable, "-m", "benchmarks.dinomx_strategies", "--worker", strategy, "--backbone", a.backbone,
           "--data", a.data, "--images", str(a.images), "--batch", str(a.batch), "--steps", str(a.steps),
           "--freeze-blocks", str(a.freeze_blocks), "--lora-r", str(a.lora_r), "--threads", str(a.threads),
           "--seed", str(a.seed), "--preset", a.preset, *a.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{strategy} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len(MARKER):])
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def summarise(rows: list[dict[str, Any]], min_ratio: float) -> dict[str, Any]:
    """Ratios against the full run, and the LoRA check."""
    by = {r["strategy"]: r for r in rows}
    full = by["full"]
    out: dict[str, Any] = {}
    for r in rows:
        r["backbone_trainable_share"] = round(r["backbone_trainable"] / r["backbone_total"], 5)
        r["fewer_backbone_trainable_than_full"] = round(full["backbone_trainable"] / max(1, r["backbone_trainable"]), 2)
        r["fewer_student_trainable_than_full"] = round(full["student_trainable"] / max(1, r["student_trainable"]), 2)
        r["peak_memory_vs_full"] = round(r["peak_memory_mb"] / full["peak_memory_mb"], 3)
        r["peak_above_start_vs_full"] = round(r["peak_above_start_mb"] / max(1e-9, full["peak_above_start_mb"]), 3)
        r["step_time_vs_full"] = round(r["median_step_s"] / full["median_step_s"], 3)
        if r["median_step_cpu_s"] is not None and full["median_step_cpu_s"]:
            r["step_cpu_time_vs_full"] = round(r["median_step_cpu_s"] / full["median_step_cpu_s"], 3)
    if "lora" in by:
        ratio = by["lora"]["fewer_backbone_trainable_than_full"]
        out["lora_check"] = {"backbone_trainable_full_over_lora": ratio, "required": min_ratio,
                             "passed": bool(ratio >= min_ratio)}
    return out


def markdown(r: dict[str, Any]) -> str:
    losses = " + ".join(r["rows"][0]["losses_on"])
    lines = [f"DINO-MX strategies on `{r['backbone']}` (`{r['preset']}` config: {losses}), batch {r['batch']}, "
             f"{r['steps']} steps each, each run in its own process on {r['rows'][0]['device']} "
             f"({r['threads']} torch threads; other processes were running, so step times are noisy). "
             "The DINO/iBOT heads train in every run: the backbone columns show what the strategy changes.", "",
             "| strategy | backbone trainable / total | student trainable / total (incl. heads) "
             "| backbone: x fewer than full | peak memory MB | peak above start MB | median s/step "
             "| median CPU-s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['strategy']} | {x['backbone_trainable']:,} / {x['backbone_total']:,} "
                     f"({100 * x['backbone_trainable_share']:.2f}%) | {x['student_trainable']:,} / "
                     f"{x['student_total']:,} | {x['fewer_backbone_trainable_than_full']:.1f}x | "
                     f"{x['peak_memory_mb']:.0f} | {x['peak_above_start_mb']:.0f} | {x['median_step_s']:.3f} | "
                     + (f"{x['median_step_cpu_s']:.3f} |" if x["median_step_cpu_s"] is not None else "n/a |"))
    c = r.get("lora_check")
    if c:
        lines += ["", f"LoRA check: full / LoRA backbone trainable parameters = "
                  f"{c['backbone_trainable_full_over_lora']:.1f}x (required >= {c['required']:.0f}x): "
                  f"{'passed' if c['passed'] else 'FAILED'}."]
    lines += ["", "Peak memory is the process's max RSS on CPU (the CUDA allocator peak on GPUs): on CPU it includes "
              f"the interpreter and the imported libraries (RSS after imports and data: "
              f"{', '.join(str(round(x['start_rss_mb'])) for x in r['rows'])} MB), so the column 'peak above start' "
              "isolates what the run itself allocated (student, EMA teacher, optimizer state, activations). Step "
              "times are medians over the steps after the first; CPU-s/step is this process's CPU time, which "
              "leaves out the time other processes held the cores. "
              "Overrides per strategy: "
              + "; ".join(f"{x['strategy']}: `{' '.join(x['overrides']) or '(none)'}`" for x in r["rows"]) + "."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit-tiny-p4", help="named config, local HF directory or hub id")
    ap.add_argument("--preset", default="default", help="training/configs/dinomx/<preset>.yaml")
    ap.add_argument("--data", default="bloodmnist", help="MedMNIST flag (28 px train split) or 'random'")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    ap.add_argument("--freeze-blocks", type=int, default=9, help="first N blocks frozen in the freeze run")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--min-lora-ratio", type=float, default=10.0)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="output path without suffix (.json and .md are written)")
    ap.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="DINO-MX config key=value for every run")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    if a.worker:
        print(MARKER + json.dumps(worker(a)), flush=True)
        return {}
    if "full" not in a.strategies:
        a.strategies = ["full", *a.strategies]  # every ratio is against the full run
    t0 = time.perf_counter()
    rows = []
    for s in a.strategies:
        rows.append(run_strategy(s, a))
        x = rows[-1]
        print(f"{s:7s} backbone trainable {x['backbone_trainable']:>10,} / {x['backbone_total']:,}, student trainable "
              f"{x['student_trainable']:,}, peak {x['peak_memory_mb']:.0f} MB, {x['median_step_s']:.3f} s/step",
              flush=True)

    r = {"backbone": a.backbone, "preset": a.preset, "data": a.data, "batch": a.batch, "steps": a.steps,
         "freeze_blocks": a.freeze_blocks, "lora_r": a.lora_r, "threads": a.threads, "overrides": a.overrides,
         "rows": rows}
    r.update(summarise(rows, a.min_lora_ratio))
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    r["host"] = host("transformers")
    from zoo import store

    out = Path(a.out)
    store.write_json_atomic(out.with_suffix(".json"), r)
    out.with_suffix(".md").write_text(markdown(r))
    c = r.get("lora_check")
    if c:
        print(f"LoRA: {c['backbone_trainable_full_over_lora']:.1f}x fewer trainable backbone parameters than full "
              f"(required >= {c['required']:.0f}x): {'passed' if c['passed'] else 'FAILED'}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return r


if __name__ == "__main__":
    res = main()
    if res.get("lora_check") and not res["lora_check"]["passed"]:
        sys.exit(1)
