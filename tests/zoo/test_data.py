"""MedMNIST metadata, file loading (names, formats, offline errors) and the one preprocessing function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPLIT_SIZES, SYNTHETIC, write_medmnist_npz

from zoo import data
from zoo.data import (
    SPLITS,
    DatasetNotFoundError,
    Preprocess,
    dataset_info,
    datasets_2d,
    iterate_batches,
    load_split,
    npz_path,
    preprocess,
)
from zoo.tasks import TASKS

FLAGS_2D = ["pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
            "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"]


def test_datasets_2d_are_the_twelve_flags():
    assert datasets_2d() == FLAGS_2D
    assert {dataset_info(f).task for f in FLAGS_2D} == set(TASKS)


@pytest.mark.parametrize("flag", FLAGS_2D)
def test_dataset_info(flag):
    from medmnist import INFO

    info = dataset_info(flag)
    assert info.flag == flag and info.task == INFO[flag]["task"]
    assert info.n_channels == INFO[flag]["n_channels"] in (1, 3)
    assert info.labels == tuple(INFO[flag]["label"][str(i)] for i in range(len(INFO[flag]["label"])))
    assert info.num_outputs == (1 if info.task == "binary-class" else len(info.labels))
    assert set(info.n_samples) == set(SPLITS)
    assert f"/{flag}.npz" in info.url(28) and f"/{flag}_64.npz" in info.url(64)
    assert info.md5(28) == INFO[flag]["MD5"] and info.md5(64) == INFO[flag]["MD5_64"]


def test_dataset_info_is_frozen():
    with pytest.raises(AttributeError):
        dataset_info("breastmnist").task = "multi-class"


def test_unknown_flag_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean breastmnist"):
        dataset_info("breastmnst")
    with pytest.raises(ValueError, match="Known: pathmnist"):
        dataset_info("zzz")


@pytest.mark.parametrize("flag", list(SYNTHETIC))
@pytest.mark.parametrize("split", SPLITS)
def test_load_split_shapes_and_values(flag, split, medmnist_root):
    _, c, k = SYNTHETIC[flag]
    s = load_split(flag, split, download=False)
    n = SPLIT_SIZES[split]
    assert s.images.dtype == torch.uint8 and s.images.shape == (n, c, 28, 28)
    assert s.labels.dtype == torch.int64
    assert s.labels.shape == (n, k if flag == "chestmnist" else 1)
    assert len(s) == n
    raw = np.load(medmnist_root / f"{flag}.npz")
    want = raw[f"{split}_images"]
    want = want[:, None] if want.ndim == 3 else want.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(s.images.numpy(), want)
    np.testing.assert_array_equal(s.labels.numpy(), raw[f"{split}_labels"].astype(np.int64))


def test_root_argument_beats_environment(tmp_path):
    write_medmnist_npz(tmp_path / "breastmnist.npz", "breastmnist", sizes={"train": 4, "val": 2, "test": 2})
    assert len(load_split("breastmnist", "train", root=tmp_path, download=False)) == 4
    assert len(load_split("breastmnist", "train", download=False)) == SPLIT_SIZES["train"]


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("breastmnist", "dev")


def test_missing_file_offline_names_path_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError) as ei:
        load_split("bloodmnist", "test", download=False)
    msg = str(ei.value)
    assert str(tmp_path / "empty" / "bloodmnist.npz") in msg
    assert "MEDMNIST_ROOT" in msg and "data.download=false" in msg
    assert "https://" in msg  # where to get the file
    assert isinstance(ei.value, FileNotFoundError)


def test_no_download_attempt_when_disabled(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must not download with download=False")

    monkeypatch.setattr(data, "_download", boom)
    with pytest.raises(DatasetNotFoundError, match="download disabled"):
        load_split("bloodmnist", "test", root=tmp_path, download=False)


def test_download_used_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake(flag, size, path):
        calls.append((flag, size, path))
        write_medmnist_npz(path, flag, sizes={"train": 6, "val": 2, "test": 2})

    monkeypatch.setattr(data, "_download", fake)
    s = load_split("breastmnist", "train", root=tmp_path)
    assert calls == [("breastmnist", 28, tmp_path / "breastmnist.npz")]
    assert len(s) == 6
    load_split("breastmnist", "val", root=tmp_path)
    assert len(calls) == 1  # the file is there now


def test_failed_download_reason_in_message(tmp_path, monkeypatch):
    def fail(flag, size, path):
        raise ConnectionError("\nno route to host\nmore detail")

    monkeypatch.setattr(data, "_download", fail)
    with pytest.raises(DatasetNotFoundError, match="download failed: ConnectionError: no route to host\\)"):
        load_split("breastmnist", "train", root=tmp_path)


def test_failed_download_reports_the_underlying_cause(tmp_path, monkeypatch):
    def fail(flag, size, path):  # medmnist wraps network errors in a generic RuntimeError
        try:
            raise OSError("Name or service not known")
        except OSError as e:
            raise RuntimeError("Something went wrong when downloading") from e

    monkeypatch.setattr(data, "_download", fail)
    with pytest.raises(DatasetNotFoundError, match="download failed: OSError: Name or service not known"):
        load_split("breastmnist", "train", root=tmp_path)


def test_download_that_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda flag, size, path: None)
    with pytest.raises(DatasetNotFoundError, match="breastmnist.npz"):
        load_split("breastmnist", "train", root=tmp_path)


def test_size_64_file_name_and_load(tmp_path):
    assert npz_path("breastmnist", 64, tmp_path) == tmp_path / "breastmnist_64.npz"
    assert npz_path("breastmnist", 28, tmp_path) == tmp_path / "breastmnist.npz"
    write_medmnist_npz(tmp_path / "breastmnist_64.npz", "breastmnist", size=64, sizes={"train": 3, "val": 2, "test": 2})
    s = load_split("breastmnist", "train", size=64, root=tmp_path, download=False)
    assert s.images.shape == (3, 1, 64, 64)
    with pytest.raises(DatasetNotFoundError, match="breastmnist.npz"):  # the 28 px file is a different file
        load_split("breastmnist", "train", size=28, root=tmp_path, download=False)


def test_invalid_size():
    with pytest.raises(ValueError, match="size must be one of"):
        npz_path("breastmnist", 32)


def test_wrong_channel_count_in_file(tmp_path):
    # dermamnist is RGB; a grey file under its name is rejected, not silently used
    arrays = {f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in SPLITS}
    arrays.update({f"{s}_labels": np.zeros((2, 1), np.uint8) for s in SPLITS})
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    with pytest.raises(ValueError, match="1 channels but dermamnist has 3"):
        load_split("dermamnist", "train", root=tmp_path, download=False)


def test_not_an_npz_file(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read .* as a MedMNIST npz"):
        load_split("breastmnist", "train", root=tmp_path, download=False)


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="train_labels.*not a MedMNIST 2D npz file"):
        load_split("breastmnist", "train", root=tmp_path, download=False)


def test_npz_missing_key_message_names_just_the_key(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks 'train_labels':"):
        load_split("breastmnist", "train", root=tmp_path, download=False)


def test_npz_wrong_dtype(tmp_path):
    arrays = {f"{s}_images": np.zeros((2, 28, 28), np.float32) for s in SPLITS}
    arrays.update({f"{s}_labels": np.zeros((2, 1), np.uint8) for s in SPLITS})
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(ValueError, match="must be uint8"):
        load_split("breastmnist", "train", root=tmp_path, download=False)


# --- preprocessing --------------------------------------------------------------------------------


def _u8(n, c, h, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, h), dtype=np.uint8))


def test_preprocess_normalisation_formula():
    x = _u8(4, 3, 28)
    p = Preprocess(28, 3, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    want = (x.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).double().view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]).double().view(1, 3, 1, 1)
    out = preprocess(x, p)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 28, 28)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)
    assert torch.equal(p(x), out)


def test_preprocess_uint8_and_unit_float_agree():
    x = _u8(2, 1, 28)
    p = Preprocess(28, 1, (0.5,), (0.5,))
    assert torch.equal(preprocess(x, p), preprocess(x.float() / 255, p))


def test_preprocess_does_not_modify_its_input():
    x = _u8(2, 1, 28).float() / 255
    before = x.clone()
    preprocess(x, Preprocess(28, 3, (0.5,), (0.5,)))
    assert torch.equal(x, before)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_preprocess_resizes_to_input_size(mode):
    x = _u8(2, 1, 28)
    out = preprocess(x, Preprocess(56, 1, (0.0,), (1.0,), mode))
    assert out.shape == (2, 1, 56, 56)
    if mode == "nearest":  # nearest 2x upsampling repeats every pixel
        torch.testing.assert_close(out[:, :, ::2, ::2], x.float() / 255)
    down = preprocess(_u8(2, 1, 64), Preprocess(28, 1, (0.0,), (1.0,), mode))
    assert down.shape == (2, 1, 28, 28)


def test_grey_replicated_only_for_rgb_models():
    x = _u8(3, 1, 28)
    rgb = preprocess(x, Preprocess(28, 3, (0.5,), (0.5,)))
    assert rgb.shape == (3, 3, 28, 28)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    assert torch.equal(rgb, preprocess(x.expand(-1, 3, -1, -1), Preprocess(28, 3, (0.5,), (0.5,))))
    assert preprocess(x, Preprocess(28, 1, (0.5,), (0.5,))).shape == (3, 1, 28, 28)


def test_rgb_to_grey_model_raises():
    with pytest.raises(ValueError, match="expects 1-channel images, got 3 channels"):
        preprocess(_u8(2, 3, 28), Preprocess(28, 1, (0.5,), (0.5,)))


def test_mean_std_length_must_fit_channels():
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        preprocess(_u8(1, 3, 28), Preprocess(28, 3, (0.5, 0.5), (0.5, 0.5)))


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches_cover_every_index_once(shuffle):
    batches = list(iterate_batches(10, 4, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    if not shuffle:
        assert torch.cat(batches).tolist() == list(range(10))
