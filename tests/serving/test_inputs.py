"""Upload checks (sniffing, pixel limits before decoding, .npy headers) and the localization helpers."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from PIL import Image, ImageFile
from serve_helpers import jpeg, lying_jpeg, mutations, npy, npy_without_brace, png, png16, seed_bodies, zero_png

from serving.inputs import RequestError, decode, open_upload, sniff
from serving.localization import Box, class_map, normalise, overlay_png, overlay_size, to_input_size, top_box


def _status(body: bytes, max_pixels: int = 10**6) -> int:
    with pytest.raises(RequestError) as e:
        decode(body, max_pixels)
    return e.value.status


def test_format_is_sniffed_from_the_bytes():
    a = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    assert sniff(png(a)) == "png" and sniff(jpeg(a)) == "jpeg" and sniff(npy(a)) == "npy"
    assert _status(b"") == 400
    assert _status(b"GIF89a" + bytes(100)) == 415
    assert _status(b"  https://example.com/scan.png") == 400
    img = decode(png(a), 10**6)
    assert img.format == "png" and (img.width, img.height) == (28, 28)
    np.testing.assert_array_equal(np.asarray(img.image), a)


def test_pixel_limit_is_checked_before_decoding():
    bomb = zero_png(8000, 8000)  # 64 MP, 64 kB
    t0 = time.perf_counter()
    with pytest.raises(RequestError) as e:
        open_upload(bomb, max_pixels=4096 * 4096)
    assert e.value.status == 413 and "64,000,000 pixels" in e.value.message
    assert time.perf_counter() - t0 < 0.5  # refused from the header, not after inflating 64 MB
    up = open_upload(zero_png(300, 200), max_pixels=10**6)
    assert (up.width, up.height, up.pixels) == (300, 200, 60000)
    assert up.load().image.size == (300, 200)
    assert _status(npy(np.zeros((2000, 1000), np.uint8)), max_pixels=10**6) == 413


def test_corrupt_and_high_bit_depth_images():
    a = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    assert _status(png(a)[:60]) == 400
    assert _status(jpeg(a)[:300]) == 400
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16) * 257).save(buf, format="PNG")
    with pytest.raises(RequestError, match="16-bit") as e:
        decode(buf.getvalue(), 10**6)
    assert e.value.status == 415


def test_npy_header_without_its_closing_brace_is_a_400():
    """numpy's header parser raises tokenize.TokenError here, which once became a 500."""
    with pytest.raises(RequestError) as e:
        decode(npy_without_brace(np.zeros((28, 28), np.uint8)), 10**6)
    assert e.value.status == 400 and "header is corrupt" in e.value.message


def test_jpeg_whose_header_claims_more_pixels_than_its_data_is_a_400():
    """4000 x 4000 in the frame header, 8 x 8 of data: libjpeg would fill the rest with grey."""
    with pytest.raises(RequestError) as e:
        decode(lying_jpeg(), 4096 * 4096)
    assert e.value.status == 400 and "truncated" in e.value.message and "4000 x 4000" in e.value.message
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as some library might set it, process-wide
    try:
        a = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
        assert _status(jpeg(a)[:-200]) == 400  # cut short: Pillow would pad it
        assert _status(png(a)[:-30]) == 400
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_16_bit_rgb_png_is_refused_like_16_bit_grey():
    """Pillow opens 16-bit RGB as 8-bit ``RGB`` (dropping the low byte), so its mode alone would pass."""
    a = np.random.default_rng(0).integers(0, 65536, (8, 8, 3))
    assert Image.open(io.BytesIO(png16(a))).mode == "RGB"
    for body in (png16(a), png16(a[:, :, 0])):
        with pytest.raises(RequestError, match="16-bit") as e:
            decode(body, 10**6)
        assert e.value.status == 415


def test_messages_name_no_memory_address_and_give_no_pickle_advice():
    with pytest.raises(RequestError) as e:
        decode(b"\x89PNG\r\n\x1a\n" + bytes(40), 10**6)  # Pillow: "cannot identify image file <_io.BytesIO ...>"
    assert e.value.status == 400 and "0x" not in e.value.message and "object at" not in e.value.message
    body = npy(np.array([[{"a": 1}]], dtype=object))
    with pytest.raises(RequestError) as e:
        decode(body, 10**6)
    assert "allow_pickle" not in e.value.message


def test_large_images_are_decoded_small():
    """``reduce_to``: libjpeg decodes at 1/8 scale; a PNG is shrunk right after decoding; sizes stay the upload's."""
    rng = np.random.default_rng(0)
    a = np.kron(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8))  # 4096 px
    up = open_upload(jpeg(a), 4096 * 4096, reduce_to=512)
    assert (up.width, up.height) == (4096, 4096) and up.decode_pixels == 512 * 512
    img = up.load()
    assert img.image.size == (512, 512) and (img.width, img.height) == (4096, 4096)
    up = open_upload(png(a[:, :3000]), 4096 * 4096, reduce_to=512)
    assert up.decode_pixels == up.pixels == 3000 * 4096
    img = up.load()
    assert img.image.size == (375, 512) and (img.width, img.height) == (3000, 4096)  # reduced by 8
    # 8 x 8 boxes inside 64 x 64 blocks of one colour: the box average is the block's colour
    np.testing.assert_array_equal(np.asarray(img.image), a[:, :3000][::8, ::8])
    small = png(a[:900, :900])  # long side under 2 x 512: decoded as it is
    assert decode(small, 10**6, reduce_to=512).image.size == (900, 900)


def test_mutated_bodies_are_refused_with_a_4xx_never_an_exception():
    """Thousands of mutated PNG, JPEG and .npy bodies: each decodes or is a RequestError with a 4xx status and a
    clean message (a few seconds)."""
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    for body in mutations(seed_bodies(), 6000):
        try:
            decode(body, 10**6)
        except RequestError as e:
            assert 400 <= e.status < 500, (e.status, e.message)
            assert not re.search(r"0x[0-9a-f]{6,}", e.message) and "allow_pickle" not in e.message, e.message
            statuses[e.status] = statuses.get(e.status, 0) + 1
    assert time.perf_counter() - t0 < 60
    assert statuses.get(400, 0) > 1000  # the mutations do reach the decoders


@pytest.mark.parametrize("array, status", [
    (np.zeros((3, 28, 28), np.uint8), 422),
    (np.zeros((28,), np.uint8), 422),
    (np.zeros((28, 28, 2), np.uint8), 422),
    (np.zeros((28, 28), np.int16), 422),
    (np.zeros((28, 28), bool), 422),
    (np.array([[{"a": 1}]], dtype=object), 422),
    (np.full((28, 28), -0.1, np.float32), 422),
    (np.full((28, 28), np.nan, np.float32), 422),
])
def test_npy_shape_dtype_and_range(array, status):
    assert _status(npy(array)) == status


def test_npy_forms_taken():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = decode(npy(rgb), 10**6)
    assert img.image.mode == "RGB" and (img.width, img.height) == (30, 20)
    grey = decode(npy(rgb[:, :, :1]), 10**6)
    assert grey.image.mode == "L"
    f = decode(npy(rgb.astype(np.float64) / 255), 10**6)
    assert isinstance(f.image, np.ndarray) and f.image.dtype == np.float32


def test_top_box_is_the_region_around_the_maximum():
    m = np.zeros((28, 28), np.float32)
    m[2:6, 3:9] = 0.8     # a second, weaker region
    m[10:20, 12:16] = 0.9
    m[14, 13] = 1.0
    assert top_box(normalise(m), 0.5) == Box(12, 10, 16, 20)
    assert top_box(normalise(m), 0.95) == Box(13, 14, 14, 15)
    assert top_box(np.zeros((28, 28), np.float32), 0.5) == Box(0, 0, 28, 28)  # no evidence: the whole image
    assert Box(1, 2, 3, 4).scaled(2.5, 2.5) == Box(2, 5, 8, 10)
    with pytest.raises(ValueError):
        top_box(m, 1.5)


def test_maps_for_each_task_and_overlay():
    cam = np.random.default_rng(0).normal(size=(1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(class_map(cam, "cam", "binary-class", 1), cam[0])
    np.testing.assert_array_equal(class_map(cam, "cam", "binary-class", 0), -cam[0])  # the negative class
    cams = np.random.default_rng(1).normal(size=(3, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(class_map(cams, "cam", "multi-class", 2), cams[2])
    attn = np.eye(4, dtype=np.float32)
    up = to_input_size(class_map(attn, "attention", "multi-class", 2), 28)
    assert up.shape == (28, 28) and up[0, 0] > up[0, 27]
    assert normalise(np.full((4, 4), 3.0)).max() == 0.0
    assert overlay_size(28, 28) == (224, 224) and overlay_size(2000, 1000) == (512, 256)
    assert overlay_size(300, 400) == (300, 400)
    data, size = overlay_png(Image.fromarray(np.zeros((28, 28), np.uint8)), normalise(cams[0]), Box(0, 0, 5, 5))
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.size == size == (224, 224) and im.mode == "RGB"
