"""``zoo.images``: the one image-reading rule (sniffed format, pixel limit before decoding, 8-bit only,
truncated data refused, ``.npy`` without pickle), from bytes or a path."""

from __future__ import annotations

import ast
import io
import struct
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image, ImageFile

from zoo.images import ImageError, clean_message, jpeg_data_problem, open_image, read_image


def _save(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _refusal(source, max_pixels: int = 10**6) -> ImageError:
    with pytest.raises(ImageError) as e:
        read_image(source, max_pixels)
    assert isinstance(e.value, ValueError)
    return e.value


def test_reads_png_jpeg_and_npy_from_bytes_or_a_path(tmp_path):
    a = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    (tmp_path / "scan.jpg").write_bytes(_save(a, "PNG"))  # the name says JPEG; the bytes say PNG
    im = read_image(tmp_path / "scan.jpg")
    assert im.format == "PNG" and im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), a)
    assert read_image(_save(a, "JPEG")).size == (28, 28)
    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32) / 255)
    f = read_image(buf.getvalue())
    assert isinstance(f, np.ndarray) and f.dtype == np.float32 and f.shape == (28, 28)


def test_refusals_and_their_statuses():
    a = np.zeros((28, 28), np.uint8)
    assert _refusal(b"GIF89a" + bytes(40)).status == 415
    assert _refusal(_save(a.astype(np.uint16) * 257, "PNG")).status == 415
    assert _refusal(_save(np.zeros((2000, 1000), np.uint8), "PNG")).status == 413
    assert _refusal(_save(a, "PNG")[:40]).status == 400
    header = np.lib.format.magic(1, 0) + b"\x76\x00" + b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), "
    assert _refusal(header.ljust(128, b" ")[:127] + b"\n" + bytes(4)).status == 400  # no closing brace


def test_a_jpeg_with_too_little_data_for_its_header_is_refused():
    j = _save(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "JPEG")
    assert jpeg_data_problem(j) is None
    i = j.index(b"\xff\xc0")
    lying = j[:i + 5] + struct.pack(">HH", 4000, 4000) + j[i + 9:]
    e = _refusal(lying, 4096 * 4096)
    assert e.status == 400 and e.message.startswith("the JPEG data is truncated: its header says 4000 x 4000")
    for kw in ({"quality": 1, "optimize": True}, {"quality": 1, "progressive": True}, {"subsampling": 2}):
        assert jpeg_data_problem(_save(np.zeros((1024, 1024, 3), np.uint8), "JPEG", **kw)) is None  # no false alarm


def test_truncated_images_stay_refused_when_a_library_allows_them():
    a = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert _refusal(_save(a, "JPEG")[:-200]).status == 400
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_header_is_read_without_decoding_and_large_images_decode_small():
    big = _save(np.zeros((2048, 4096), np.uint8), "JPEG")
    opened = open_image(big, 4096 * 4096, reduce_to=256)
    assert (opened.width, opened.height) == (4096, 2048) and opened.decode_pixels == 512 * 256
    assert opened.load().size == (256, 128)  # libjpeg stops at 1/8 scale; the rest is an integer reduce


def test_messages_carry_no_address_and_no_pickle_advice():
    assert clean_message("cannot identify image file <_io.BytesIO object at 0x7fec707c45e0>") == \
        "cannot identify image file"
    assert "allow_pickle" not in clean_message(ValueError("Object arrays cannot be loaded when allow_pickle=False"))


def test_the_module_imports_only_the_standard_library_numpy_and_pillow():
    """A core module: never serving, export, training, benchmarks or the zoo.api facade (nor torch)."""
    tree = ast.parse((REPO / "zoo" / "images.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) <= {"numpy", "PIL"}, names
