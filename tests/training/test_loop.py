"""The loop: reproducible, follows its lr schedule, keeps the best-validation-AUC weights."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny_overrides

from training import loop
from training.config import ConfigError, load_config
from training.entries import train_config
from training.loop import amp_dtype, fit, make_optimizer, seed_everything
from training.medalmighty.config import parse
from training.medalmighty.losses import MedAlmightyLoss
from training.medalmighty.recipe import student_settings
from training.schedules import lr_factors
from zoo import store
from zoo.data import Preprocess, load_split
from zoo.models import create_student, state_dict_sha256


def _train_cfg(**kw):
    """The default recipe's train section as the loop's settings, with test-sized changes."""
    settings = student_settings(parse(load_config(None, family="medalmighty")), progress=False)
    return dataclasses.replace(settings, **{"epochs": 2, "batch_size": 32, **kw})


def _separable(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + 2.0 * (y[:, None] * 2 - 1)
    return x, y[:, None]


def _fit_student(seed, epochs=2, **cfg_kw):
    tr, va = load_split("breastmnist", "train"), load_split("breastmnist", "val")
    gen = seed_everything(seed)
    torch.manual_seed(seed)
    net = create_student("resnet-test", 1, 1)
    return fit(net, (tr.images, tr.labels), (va.images, va.labels), task="binary-class",
               settings=_train_cfg(epochs=epochs, **cfg_kw), loss_fn=MedAlmightyLoss("binary-class", 1.0),
               prep=Preprocess(28, 1, (0.5,), (0.5,)), generator=gen)


def test_fit_is_bit_reproducible():
    a, b = _fit_student(0), _fit_student(0)
    assert state_dict_sha256(a.model) == state_dict_sha256(b.model)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = _fit_student(1)
    assert state_dict_sha256(c.model) != state_dict_sha256(a.model)


def test_zoo_train_runs_are_bit_identical(tmp_path):
    ov = tiny_overrides("baseline", "dermamnist", None, "train.epochs=1")
    d1 = train_config("medalmighty/default.yaml", ov + [f"output_dir={tmp_path / 'a'}"], progress=False)
    d2 = train_config("medalmighty/default.yaml", ov + [f"output_dir={tmp_path / 'b'}"], progress=False)
    assert d1 != d2
    assert store.sha256_file(d1 / "model.safetensors") == store.sha256_file(d2 / "model.safetensors")


def test_fit_learns_a_separable_problem():
    torch.manual_seed(0)
    head = nn.Linear(8, 1)
    res = fit(head, _separable(128, 0), _separable(64, 1), task="binary-class",
              settings=_train_cfg(epochs=5, lr=0.05, schedule="constant"), loss_fn=MedAlmightyLoss("binary-class", 1.0),
              generator=torch.Generator().manual_seed(0))
    assert res.best_val["auc"] > 0.99 and res.best_val["acc"] > 0.95
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert not res.model.training


def test_best_checkpoint_is_chosen_on_val_auc(monkeypatch):
    # Script the validation AUCs; record the weights at each validation to compare with the result.
    aucs = iter([0.6, 0.9, 0.7, 0.9])
    snapshots = []
    head = nn.Linear(8, 1)
    real = loop.compute_metrics

    def scripted(y, scores, task):
        snapshots.append(copy.deepcopy(head.state_dict()))
        return {"acc": real(y, scores, task)["acc"], "auc": next(aucs)}

    monkeypatch.setattr(loop, "compute_metrics", scripted)
    res = fit(head, _separable(64, 0), _separable(32, 1), task="binary-class",
              settings=_train_cfg(epochs=4, lr=0.05, schedule="constant"), loss_fn=MedAlmightyLoss("binary-class", 1.0),
              generator=torch.Generator().manual_seed(0))
    val_aucs = [h["val_auc"] for h in res.history]
    assert val_aucs == [0.6, 0.9, 0.7, 0.9]
    assert res.best_epoch == 2  # the first of equal bests: later ties do not replace it
    assert res.best_val["auc"] == 0.9
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, snapshots[1][k])
    assert not torch.equal(snapshots[1]["weight"], snapshots[3]["weight"])  # training did move on


def test_best_epoch_is_argmax_of_val_auc_in_a_real_run():
    res = _fit_student(0, epochs=3)
    aucs = [h["val_auc"] for h in res.history]
    assert res.best_epoch == aucs.index(max(aucs)) + 1
    assert res.best_val["auc"] == max(aucs)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]


def test_test_split_logged_only_on_request():
    tr, va = load_split("breastmnist", "train"), load_split("breastmnist", "val")
    for flag in (False, True):
        torch.manual_seed(0)
        res = fit(create_student("resnet-test", 1, 1), (tr.images, tr.labels), (va.images, va.labels),
                  task="binary-class", settings=_train_cfg(epochs=1, log_test_every_epoch=flag),
                  loss_fn=MedAlmightyLoss("binary-class", 1.0), prep=Preprocess(28, 1, (0.5,), (0.5,)),
                  test=(va.images, va.labels), generator=torch.Generator().manual_seed(0))
        assert ("test_auc" in res.history[0]) == flag


def test_multistep_schedule():
    f = lr_factors("multistep", 100, 10, milestones=[0.5, 0.75], gamma=0.1)
    assert f[0] == 1.0 and f[499] == 1.0
    assert f[500] == pytest.approx(0.1) and f[749] == pytest.approx(0.1)
    assert f[750] == pytest.approx(0.01) and f[999] == pytest.approx(0.01)
    g = lr_factors("multistep", 4, 3)  # defaults: milestones 0.5/0.75, gamma 0.1
    assert [round(g[s], 6) for s in range(12)] == [1.0] * 6 + [0.1] * 3 + [0.01] * 3


def test_cosine_schedule_with_warmup():
    steps, epochs = 10, 20
    f = lr_factors("cosine", epochs, steps, warmup_epochs=2)
    warm = [f[s] for s in range(20)]
    assert warm == pytest.approx([(s + 1) / 20 for s in range(20)])  # linear warm-up to 1
    decay = [f[s] for s in range(20, epochs * steps)]
    assert decay[0] == 1.0
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f[20 + 90] == pytest.approx(0.5)  # half way through the decay
    assert f[epochs * steps - 1] < 1e-3  # ~0 at the end
    assert lr_factors("cosine", 3, 5)[0] == 1.0  # no warm-up


def test_constant_and_unknown_schedule():
    assert lr_factors("constant", 3, 5)[14] == 1.0
    # lr_factors serves every recipe, so its own error names no config section; the train.schedule
    # key is checked (and named) when the config is parsed.
    with pytest.raises(ValueError, match="schedule must be multistep, cosine or constant"):
        lr_factors("step", 3, 5)
    with pytest.raises(ConfigError, match="train.schedule must be"):
        parse(load_config(None, ["train.schedule=step"], family="medalmighty"))


def test_optimizer_follows_schedule_during_fit(monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    fit(nn.Linear(8, 1), _separable(32, 0), _separable(16, 1), task="binary-class",
        settings=_train_cfg(epochs=4, batch_size=16, lr=1.0, schedule="multistep"),
        loss_fn=MedAlmightyLoss("binary-class", 1.0), generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx([1.0] * 4 + [0.1] * 2 + [0.01] * 2)


def test_min_steps_extends_epochs_and_schedule(monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    # 32 samples, batch 16: 2 steps an epoch; 1 epoch asked, at least 7 steps -> 4 epochs
    res = fit(nn.Linear(8, 1), _separable(32, 0), _separable(16, 1), task="binary-class",
              settings=_train_cfg(epochs=1, min_steps=7, batch_size=16, lr=1.0, schedule="multistep"),
              loss_fn=MedAlmightyLoss("binary-class", 1.0), generator=torch.Generator().manual_seed(0))
    assert len(res.history) == 4
    assert seen == pytest.approx([1.0] * 4 + [0.1] * 2 + [0.01] * 2)  # milestones of the 4-epoch run
    res = fit(nn.Linear(8, 1), _separable(32, 0), _separable(16, 1), task="binary-class",
              settings=_train_cfg(epochs=3, min_steps=2, batch_size=16), loss_fn=MedAlmightyLoss("binary-class", 1.0),
              generator=torch.Generator().manual_seed(0))
    assert len(res.history) == 3  # min_steps below epochs x steps changes nothing


def test_max_steps_caps_epochs_in_whole_epochs_and_min_steps_wins():
    def epochs(**kw) -> int:
        res = fit(nn.Linear(8, 1), _separable(96, 0), _separable(16, 1), task="binary-class",
                  settings=_train_cfg(batch_size=16, **kw), loss_fn=MedAlmightyLoss("binary-class", 1.0),
                  generator=torch.Generator().manual_seed(0))
        return len(res.history)

    # 96 samples, batch 16: 6 steps an epoch
    assert epochs(epochs=5, max_steps=20) == 3   # 18 steps: whole epochs within the cap
    assert epochs(epochs=2, max_steps=20) == 2   # a cap above epochs x steps changes nothing
    assert epochs(epochs=5, max_steps=4) == 1    # at least one epoch
    assert epochs(epochs=5, min_steps=13, max_steps=14) == 3  # min_steps wins: 18 steps


def test_history_lr_is_the_lr_used_in_that_epoch():
    res = fit(nn.Linear(8, 1), _separable(32, 0), _separable(16, 1), task="binary-class",
              settings=_train_cfg(epochs=4, batch_size=16, lr=1.0, schedule="multistep"),
              loss_fn=MedAlmightyLoss("binary-class", 1.0), generator=torch.Generator().manual_seed(0))
    assert [h["lr"] for h in res.history] == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_amp_dtype():
    cpu = torch.device("cpu")
    assert amp_dtype("none", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("auto", cpu) in (None, torch.bfloat16)
    # amp_dtype serves train.amp and optim.amp alike: its error names no section; parsing names the key.
    with pytest.raises(ValueError, match="amp must be none, bf16 or auto"):
        amp_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="train.amp must be"):
        parse(load_config(None, ["train.amp=fp16"], family="medalmighty"))


def test_bf16_autocast_trains_on_cpu():
    res = _fit_student(0, epochs=1, amp="bf16", channels_last=True)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("sgd", torch.optim.SGD)])
def test_make_optimizer(name, cls):
    # Typed arguments now: the config parser turns YAML values into numbers (and names a bad key).
    opt = make_optimizer(nn.Linear(2, 1).parameters(), name, 1e-3, weight_decay=0.0)
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="optimizer must be adam, adamw or sgd"):
        make_optimizer(nn.Linear(2, 1).parameters(), "lion", 1, weight_decay=0)
    with pytest.raises(ConfigError, match="train.optimizer must be"):
        parse(load_config(None, ["train.optimizer=lion"], family="medalmighty"))
