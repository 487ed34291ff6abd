"""A `zoo pretrain` killed at a random step (SIGKILL) and started again with the same command resumes
from its last checkpoint and ends with the weights of an uninterrupted run of the same seed."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE_ENV, REPO, THREADS_ENV
from safetensors.torch import load_file

from training import checkpoint

STEPS = 10
TINY = ["model.backbone=vit-test", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size=8", f"optim.steps={STEPS}", "crops.local_number=2", "log.every=1", "eval.linear=false",
        "data.download=false", "data.datasets=[breastmnist]", "checkpoint.every=1", "run_name=tiny",
        # The prototype layer frozen for the first steps and the Gram anchor taken half-way: the
        # checkpoint must carry both (and the loss centers, the optimizer, the schedules' position).
        "optim.freeze_last_layer=0.3", "gram.loss_weight=0.5", "gram.start=0.5", "gram.refresh_every=0.2"]


def _pretrain(out: Path) -> subprocess.Popen:
    """The command a user runs (and runs again after a crash); progress on, so a resume is announced."""
    cmd = [sys.executable, "-m", "zoo.cli", "pretrain", "dinomx/default.yaml", *TINY, f"output_dir={out}"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **OFFLINE_ENV, **THREADS_ENV}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"zoo pretrain failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _checkpoint_step(path: Path) -> int:
    """Step of the checkpoint at ``path`` (0 when there is none yet); written atomically, so never half a file."""
    if not path.is_file():
        return 0
    return int(checkpoint.load(path)["step"])  # checksummed format: never torch.load directly


@pytest.mark.slow
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    kill_at = random.randint(1, STEPS - 3)  # after at least one checkpoint, well before the end
    whole = _pretrain(tmp_path / "whole")  # the uninterrupted run, alongside
    ckpt = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pt"
    victim = _pretrain(tmp_path / "killed")
    deadline = time.monotonic() + 240
    while _checkpoint_step(ckpt) < kill_at:
        assert victim.poll() is None, f"the run ended before step {kill_at}: {victim.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # wherever it is: mid-step, or mid-way through writing a checkpoint
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    saved = _checkpoint_step(ckpt)
    assert kill_at <= saved < STEPS, (kill_at, saved)

    out = _finish(_pretrain(tmp_path / "killed"))  # the same command again
    m = re.search(r"resuming from \S+ at step (\d+)/(\d+)", out)
    assert m and (int(m[1]), int(m[2])) == (saved, STEPS), (kill_at, out[-2000:])
    _finish(whole)

    a, b = tmp_path / "killed" / "tiny", tmp_path / "whole" / "tiny"
    assert json.loads((a / "config.json").read_text())["lineage"]["resumed"] is True
    for f in ("model.safetensors", "dinomx_heads.safetensors"):
        wa, wb = load_file(a / "backbone" / f), load_file(b / "backbone" / f)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{f}:{k} (killed at {kill_at})")
    ca, cb = (checkpoint.load(d / "checkpoints" / "last.pt") for d in (a, b))
    assert ca["step"] == cb["step"] == STEPS
    for part in ("student", "teacher", "gram_anchor"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            torch.testing.assert_close(ca[part][k], cb[part][k], rtol=0, atol=1e-6, msg=f"{part}.{k}")
    for k in ("dino_center", "ibot_center"):
        torch.testing.assert_close(ca[k], cb[k], rtol=0, atol=1e-6)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ca["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in cb["history"]]
    assert [h["step"] for h in ca["history"]] == list(range(1, STEPS + 1))
