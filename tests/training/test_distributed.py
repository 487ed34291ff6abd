"""Data parallelism on CPU with gloo: 2-process DDP, FSDP and DeepSpeed ZeRO-2/3 train as one process does.

The multi-process runs are real ``torchrun`` launches (``python -m torch.distributed.run
--standalone``). One launch of this file's worker section trains DINO-MX under every strategy in
turn (stopping half-way and resuming from the checkpoint in a new trainer, so each strategy's
full-state save/load is part of the comparison) and then MedAlmighty's ``fit``; the tests compare
what it wrote with single-process runs on the same global batches. One launch per strategy would
spend most of the time importing torch, transformers and DeepSpeed again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = "dinomx/default.yaml"
# A tiny DINOv2-style run: DINO + iBOT + KoLeo, 2 local crops, 4 steps of 8 images, fp32 (exact
# comparison), a clip norm small enough to clip every step, and the prototype layer frozen for the
# first half of the run and trained in the second (so every runner's drop_grads is exercised, and
# the first updates after the unfreeze must be a first Adam step's, as in one process: DeepSpeed's
# flat groups once shared the step counter, scaling those updates). The resume at step STOP is at
# the unfreeze. head.hidden_dim=384 makes one head layer larger than DeepSpeed's ZeRO-3 persistence
# threshold (1e5 elements), so ZeRO-3 partitions it.
TINY = ["model.backbone=vit-test", "head.out_dim=64", "head.hidden_dim=384", "head.bottleneck_dim=16",
        "optim.batch_size=8", "optim.steps=4", "crops.local_number=2", "optim.amp=none", "optim.clip_grad=0.05",
        "optim.freeze_last_layer=0.5", "log.progress=false", "log.every=1", "eval.linear=false",
        "data.download=false", "data.datasets=[breastmnist]", "checkpoint.every=2", "run_name=tiny"]
STOP = 2  # the worker's first trainer stops here; a second one resumes from its checkpoint
STRATEGIES = {"ddp": ["distributed.strategy=ddp"], "fsdp": ["distributed.strategy=fsdp"],
              "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
              "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]}
RUNNERS = {"ddp": "DDPRunner", "fsdp": "FSDPRunner", "zero2": "DeepSpeedRunner", "zero3": "DeepSpeedRunner"}
LOSSES = ("loss", "dino", "ibot", "koleo", "grad_norm")
# Sinkhorn-Knopp targets for DINO and iBOT, and one masked global crop in each step's 16: every step,
# one of the two processes holds no masked patch and hands Sinkhorn-Knopp no rows (it once crashed
# there, and the other process then waited in its all-reduce: a hang under NCCL).
SINKHORN_EMPTY_RANK = ["dino.centering=sinkhorn", "ibot.centering=sinkhorn", "ibot.mask_probability=0.0625"]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two processes on this machine (gloo), a free rendezvous port, one thread each, offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


# -- DINO-MX -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process(session_env, tmp_path_factory) -> Path:
    """The reference: one process, the same config, uninterrupted."""
    from training.dinomx.recipe import pretrain_config

    out = tmp_path_factory.mktemp("single")
    d, metrics = pretrain_config(CONFIG, [*TINY, f"output_dir={out}"], progress=False)
    assert metrics is not None and metrics["report"]["world_size"] == 1
    return d


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from training import checkpoint

    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")  # checksummed format: never torch.load directly
    return {"backbone": load_file(run / "backbone" / "model.safetensors"), "student": ckpt["student"],
            "teacher": ckpt["teacher"]}


@pytest.fixture(scope="module")
def single_process_sinkhorn(session_env, tmp_path_factory) -> Path:
    from training.dinomx.recipe import pretrain_config

    out = tmp_path_factory.mktemp("single_sinkhorn")
    d, metrics = pretrain_config(CONFIG, [*TINY, *SINKHORN_EMPTY_RANK, f"output_dir={out}"], progress=False)
    assert metrics is not None
    return d


@pytest.fixture(scope="module")
def two_processes(session_env, tmp_path_factory) -> Path:
    """One torchrun: DINO-MX under each strategy (``<out>/<strategy>/``), then ``fit`` (``<out>/fit.json``)."""
    out = tmp_path_factory.mktemp("two_processes")
    torchrun(__file__, str(out), timeout=400)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_train_like_one(strategy, two_processes, single_process):
    run = two_processes / strategy / "tiny"
    facts = [json.loads((two_processes / strategy / f"rank{r}.json").read_text()) for r in range(2)]
    assert [f["runner"] for f in facts] == [RUNNERS[strategy]] * 2 and [f["world"] for f in facts] == [2, 2]
    if strategy == "ddp":
        assert facts[0]["local_share"] == 1.0  # a whole replica per process
    else:  # parameters (FSDP, ZeRO-3) or optimizer state (ZeRO-2) really are split between the two
        assert all(f["local_share"] < 0.75 for f in facts), facts

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["report"]["world_size"] == 2
    assert metrics["report"]["strategy"] == STRATEGIES[strategy][0].split("=")[1]
    config = json.loads((run / "config.json").read_text())
    assert config["lineage"]["resumed"] is True  # the second trainer continued from step STOP

    ref = json.loads((single_process / "metrics.json").read_text())["history"]
    got = metrics["history"]
    assert [h["step"] for h in got] == [h["step"] for h in ref] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (strategy, a["step"], k)

    mine, theirs = _weights(run), _weights(single_process)
    for part in mine:
        assert mine[part].keys() == theirs[part].keys(), part
        for k in mine[part]:
            torch.testing.assert_close(mine[part][k], theirs[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")


def _sinkhorn_scores() -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(3)) * 3


@pytest.mark.slow
def test_sinkhorn_knopp_with_an_empty_process(two_processes):
    """Process 0 holds 6 rows, process 1 none: process 0 gets one process's targets for its 6 rows, process 1 (0, K)."""
    from training.dinomx.losses import sinkhorn_knopp

    got = [json.loads((two_processes / f"sinkhorn_rank{r}.json").read_text()) for r in range(2)]
    assert torch.tensor(got[1]["q"]).numel() == 0 and got[1]["shape"] == [0, 8]
    torch.testing.assert_close(torch.tensor(got[0]["q"]), sinkhorn_knopp(_sinkhorn_scores(), 0.1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_ibot_sinkhorn_step_with_a_process_without_masked_crops(two_processes, single_process_sinkhorn):
    """A DDP run in which every step one process has no masked crop finishes and matches one process."""
    got = json.loads((two_processes / "sinkhorn_empty_rank" / "tiny" / "metrics.json").read_text())["history"]
    ref = json.loads((single_process_sinkhorn / "metrics.json").read_text())["history"]
    assert [h["step"] for h in got] == [h["step"] for h in ref] == [1, 2, 3, 4]
    assert all(h["ibot"] > 0 for h in ref)  # the one masked crop does count
    for a, b in zip(got, ref):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)


# -- MedAlmighty ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_medalmighty_fit_splits_each_batch_exactly(two_processes):
    """fit() under every strategy against fit() in one process: a small MLP (no batch norm, whose
    statistics are per process on CPU), a last batch split 2/1, teacher logits for the KD term."""
    res = json.loads((two_processes / "fit.json").read_text())
    ref = res.pop("single")
    assert set(res) == {"ddp", "fsdp", "zero2", "zero3"}
    for strategy, got in res.items():
        assert got["best_epoch"] == ref["best_epoch"], strategy
        for a, b in zip(got["history"], ref["history"]):
            for k in ("loss", "task", "kd", "val_auc", "lr"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (strategy, a["epoch"], k)
        for k, v in got["state"].items():
            torch.testing.assert_close(torch.tensor(v), torch.tensor(ref["state"][k]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zoo_train_under_torchrun_ddp(tmp_path):
    """`torchrun -m zoo.cli train ... distributed.strategy=ddp`: one run folder, written by rank 0 only."""
    from conftest import tiny_overrides

    from training.entries import train_config
    from zoo.api import evaluate, load

    ov = tiny_overrides("baseline", "breastmnist", None)
    one = train_config("medalmighty/default.yaml", ov + [f"output_dir={tmp_path / 'one'}"], progress=False)
    torchrun("-m", "zoo.cli", "train", "medalmighty/default.yaml", *ov, f"output_dir={tmp_path / 'two'}",
             "distributed.strategy=ddp", "--quiet")
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1 and not runs[0].name.startswith(".")
    m2 = json.loads((runs[0] / "metrics.json").read_text())
    m1 = json.loads((one / "metrics.json").read_text())
    assert json.loads((runs[0] / "config.json").read_text())["config"]["distributed"]["strategy"] == "ddp"
    assert len(m2["history"]) == len(m1["history"]) == 2
    # Each process normalises its batch-norm layers with its own 16 rows (SyncBatchNorm is CUDA-only),
    # so the losses are close to the single-process ones, not equal.
    for a, b in zip(m2["history"], m1["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)
    assert evaluate(load(runs[0]), "test")["n"] == 48


# -- the worker (run by torchrun) ---------------------------------------------------------------
def _local_share(runner) -> float:
    """Elements this process stores over the full count: parameters (FSDP, ZeRO-3), optimizer state (ZeRO-2)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in runner.inner.parameters() if p.requires_grad]
    if type(runner).__name__ == "DeepSpeedRunner":
        if runner.stage == 3:
            return sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)
        return sum(f.numel() for f in runner._flat_partitions()) / sum(p.numel() for p in params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local / sum(p.numel() for p in params)


def _pretrain_worker(out: Path, overrides: list[str]) -> None:
    from training.config import load_config
    from training.dinomx.recipe import Pretraining, run_name
    from zoo.cli import main

    overrides = [*overrides, f"output_dir={out}"]
    cfg = load_config(CONFIG, overrides=overrides)
    ckpt = Path(cfg["output_dir"]) / run_name(cfg) / "checkpoints"
    pt = Pretraining(cfg)
    pt.fit(ckpt, progress=False, stop_after=STOP)  # writes the step-STOP checkpoint, then stops
    (out / f"rank{pt.env.rank}.json").write_text(json.dumps(
        {"runner": type(pt.runner).__name__, "world": pt.env.world, "local_share": _local_share(pt.runner)}))
    del pt
    rc = main(["pretrain", CONFIG, *overrides, "--quiet"])  # a new trainer: resumes and finishes
    if rc:
        raise SystemExit(rc)


def _sinkhorn_worker(out: Path) -> None:
    from training import distributed as D
    from training.dinomx.losses import sinkhorn_knopp

    env = D.init("ddp")
    scores = _sinkhorn_scores() if env.rank == 0 else torch.zeros(0, 8)
    q = sinkhorn_knopp(scores, 0.1)
    (out / f"sinkhorn_rank{env.rank}.json").write_text(json.dumps({"q": q.tolist(), "shape": list(q.shape)}))


def _fit_worker(out: Path) -> None:
    import dataclasses

    import torch.nn as nn

    from training import distributed as D
    from training.config import load_config
    from training.loop import fit
    from training.medalmighty.config import parse
    from training.medalmighty.losses import MedAlmightyLoss
    from training.medalmighty.recipe import student_settings

    env = D.init("ddp")
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(147) % 2)[:, None]
    x = torch.randn(147, 8, generator=g) + 1.5 * (y * 2 - 1)
    teacher = torch.randn(99, 1, generator=g)
    settings = dataclasses.replace(student_settings(parse(load_config(None, family="medalmighty")), progress=False),
                                   epochs=3, batch_size=32, amp="none", lr=0.01)

    def one(e: D.DistEnv | None, strategy: str = "none", stage: int = 2) -> dict:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
        r = fit(net, (x[:99], y[:99]), (x[99:], y[99:]), task="binary-class", settings=settings,
                loss_fn=MedAlmightyLoss("binary-class", 0.5, 2.0), teacher_logits=teacher,
                generator=torch.Generator().manual_seed(1),
                env=dataclasses.replace(e, strategy=strategy) if e else None, zero_stage=stage)
        return {"history": r.history, "best_epoch": r.best_epoch,
                "state": {k: v.tolist() for k, v in r.model.state_dict().items()}}

    res = {"single": one(None)} if env.is_main else {}
    res.update(ddp=one(env, "ddp"), fsdp=one(env, "fsdp"), zero2=one(env, "deepspeed", 2),
               zero3=one(env, "deepspeed", 3))
    if env.is_main:
        (out / "fit.json").write_text(json.dumps(res))


if __name__ == "__main__":
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()  # a crash in a worker shows its Python stacks in the test's report
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    where = Path(sys.argv[1])
    _sinkhorn_worker(where)
    for name, extra in STRATEGIES.items():
        _pretrain_worker(where / name, [*TINY, *extra])
    _pretrain_worker(where / "sinkhorn_empty_rank", [*TINY, *SINKHORN_EMPTY_RANK, "distributed.strategy=ddp"])
    _fit_worker(where)
    # Both processes leave together, the process group torn down first, without the interpreter's
    # module teardown: twice in about twenty launches a worker aborted there ("terminate called
    # without an active exception") after everything was written, and torchrun reported a failure.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
