"""Students in timm's terms: each loaded student's ``pretrained_cfg`` is its entry's; ``medmnist_*`` load with timm."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from conftest import install
from PIL import Image

import zoo
from zoo.loading import build_net
from zoo.registry import get_entry
from zoo.timm_models import PREFIX, pretrained_cfg, timm_arch


@pytest.mark.parametrize("name", ["baseline-resnet18-breastmnist", "medalmighty-resnet50-dermamnist",
                                  "baseline-seresnet50-pathmnist.224", "ensemble-resnet18-chestmnist"])
def test_resolve_data_config_is_the_entry(name):
    e = get_entry(name)
    cfg = timm.data.resolve_data_config(model=build_net(e, {}))
    assert cfg == {"input_size": (e.in_chans, e.input_size, e.input_size), "interpolation": e.resize,
                   "mean": e.preprocess.mean, "std": e.preprocess.std, "crop_pct": 1.0, "crop_mode": "center"}


def test_pretrained_cfg_fields():
    e = get_entry("baseline-resnet18-breastmnist")
    cfg = pretrained_cfg(e)
    assert (cfg["architecture"], cfg["tag"], cfg["num_classes"]) == ("medmnist_resnet18", e.name, 1)
    assert cfg["label_names"] == e.labels and cfg["license"] == e.license
    assert "hf_hub_id" not in cfg and "url" not in cfg  # no ImageNet weights named anywhere
    hub = pretrained_cfg(dataclasses.replace(e, weights="hf-hub:org/repo@v1"))
    assert hub["hf_hub_id"] == "org/repo@v1"
    assert timm_arch(get_entry("baseline-resnet18-breastmnist.224")) == "resnet18"  # standard stem: timm's own


def test_loaded_student_and_transform(built_resnet18_breast):
    install(built_resnet18_breast)
    net = zoo.load("baseline-resnet18-breastmnist").net
    e = get_entry("baseline-resnet18-breastmnist")
    assert net.default_cfg is net.pretrained_cfg and net.pretrained_cfg["input_size"] == (1, 28, 28)
    cfg = timm.data.resolve_data_config(model=net)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56), dtype=np.uint8), "L")
    x = timm.data.create_transform(**cfg)(img)
    assert x.shape == (1, 28, 28)
    # timm's eval transform (PIL resize, bilinear) normalises as the zoo does: same values on a 28 px image
    small = img.resize((28, 28))
    want = e.preprocess(torch.from_numpy(np.array(small))[None, None])[0]
    assert torch.allclose(timm.data.create_transform(**cfg)(small), want, atol=1e-6)


def test_timm_create_model_loads_entry(built_resnet18_breast):
    install(built_resnet18_breast)
    assert f"{PREFIX}resnet18" in zoo.register_timm_models() and timm.is_model(f"{PREFIX}resnet18")
    zoo.register_timm_models()  # idempotent
    kw = zoo.timm_kwargs("baseline-resnet18-breastmnist")
    net = timm.create_model(**kw).eval()
    ref = zoo.load("baseline-resnet18-breastmnist").net
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    assert timm.data.resolve_data_config(model=net) == timm.data.resolve_data_config(model=ref)
    assert net.pretrained_cfg["file"].endswith("model.safetensors")
    # the plain call, as a timm user writes it
    plain = timm.create_model("medmnist_resnet18", pretrained=True, num_classes=1, in_chans=1,
                              pretrained_cfg_overlay=dict(file=kw["pretrained_cfg_overlay"]["file"]))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))


def test_timm_create_model_is_strict(built_resnet18_breast):
    zoo.register_timm_models()
    f = str(built_resnet18_breast / "model.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch"):  # a wrong head is an error, never silently dropped
        timm.create_model("medmnist_resnet18", pretrained=True, num_classes=3, in_chans=1,
                          pretrained_cfg_overlay=dict(file=f))
    with pytest.raises(ValueError, match="no weights of its own"):
        timm.create_model("medmnist_resnet18", pretrained=True)


def test_standard_stem_entry_loads_in_timms_own_resnet(tmp_path):
    from safetensors.torch import save_file

    from zoo.models import create_student

    e = get_entry("baseline-resnet18-breastmnist.224")
    torch.manual_seed(0)
    ref = create_student(e.arch, e.num_outputs, e.in_chans, small_stem=False).eval()
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    overlay = {k: v for k, v in pretrained_cfg(e).items() if k not in ("architecture", "tag")}
    net = timm.create_model("resnet18", pretrained=True, num_classes=1, in_chans=1,
                            pretrained_cfg_overlay=dict(overlay, file=str(tmp_path / "model.safetensors"))).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x))
    assert timm.data.resolve_data_config(model=net)["input_size"] == (1, 224, 224)
