"""Request bodies -> images, checked before anything is decoded in full.

The service reads the raw body itself (BentoML's ``PIL.Image`` parameters answer non-image bytes
with a 500 and fetch URLs), so every rule for untrusted input lives here:

- the format is sniffed from the first bytes (PNG, JPEG or NumPy ``.npy``); the file name and the
  ``Content-Type`` header are not trusted;
- the pixel count is read from the header and checked against a limit *before* decoding, so a small
  file that inflates to gigabytes (a decompression bomb) is refused without allocating it;
- 8-bit images only: 16-bit and float PNG modes would be clipped by Pillow's conversion to
  ``L``/``RGB`` (every value above 255 becomes 255), so they are refused with what to do instead;
- ``.npy`` arrays are read without pickle, as ``(H, W)`` or ``(H, W, C)`` with C 1 or 3, uint8 or float
  in [0, 1] (the forms ``ZooModel.predict`` takes).

Every refusal is an :class:`RequestError` carrying an HTTP status and a message for the client.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
# Pillow modes that convert to L/RGB without losing range; I;16, I and F are refused (see the module doc).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
FORMS = "PNG, JPEG or a NumPy .npy array"


class RequestError(ValueError):
    """A request the service refuses: ``status`` is the HTTP status, the message says what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """A checked, decoded upload.

    Attributes:
        format: ``png``, ``jpeg`` or ``npy``.
        image: a Pillow image in an 8-bit mode, or a float array (H, W[, C]) in [0, 1] (``.npy`` floats).
        width, height: pixels.
    """

    format: str
    image: Image.Image | np.ndarray
    width: int
    height: int


def sniff(body: bytes) -> str:
    """The body's format from its first bytes: ``png``, ``jpeg`` or ``npy``; anything else is refused."""
    if not body:
        raise RequestError(400, "empty request body: send the image bytes (" + FORMS + ") as the body")
    head = body[:16].lstrip()
    if head[:8].lower().startswith((b"http://", b"https://", b'"http://', b'"https://')):
        raise RequestError(400, "this service does not fetch URLs: send the image bytes themselves as the body "
                           "(curl --data-binary @image.png)")
    if body.startswith(PNG_MAGIC):
        return "png"
    if body.startswith(JPEG_MAGIC):
        return "jpeg"
    if body.startswith(NPY_MAGIC):
        return "npy"
    raise RequestError(415, f"the body is not a supported image: expected {FORMS} (checked from its first bytes, "
                       "not its name or Content-Type)")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise RequestError(422, f"the image is empty ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise RequestError(413, f"the image has {width} x {height} = {width * height:,} pixels; this server takes at "
                           f"most {max_pixels:,} (resize it first: the model sees only its own input size)")


@dataclass(frozen=True)
class Upload:
    """An upload whose format and size are known and checked; :meth:`load` decodes it in full."""

    format: str
    width: int
    height: int
    body: bytes
    image: Image.Image | None = None  # Pillow's lazily opened image (png, jpeg)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def load(self) -> DecodedImage:
        if self.format == "npy":
            return _load_npy(self.body)
        return _load_image(self.image, self.format)


def open_upload(body: bytes, max_pixels: int) -> Upload:
    """Sniff the format and read the header: cheap, nothing decoded yet, pixel limit checked."""
    fmt = sniff(body)
    if fmt == "npy":
        shape, _ = _npy_header(body)
        check_pixels(shape[1], shape[0], max_pixels)
        return Upload(fmt, shape[1], shape[0], body)
    name = fmt.upper()
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's DecompressionBombWarning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(body), formats=[name])  # reads the header only
    except Image.DecompressionBombError:  # Pillow refuses more than 2 x MAX_IMAGE_PIXELS while reading the header
        raise RequestError(413, f"the image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; this server takes "
                           f"at most {max_pixels:,} (resize it first: the model sees only its own input size)"
                           ) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise RequestError(400, f"the {name} data is corrupt or truncated: {e}") from None
    check_pixels(im.width, im.height, max_pixels)
    if im.mode not in EIGHT_BIT_MODES:
        raise RequestError(415, f"the {name} image has mode {im.mode} ({_depth(im.mode)}); the models take "
                           "8-bit images: convert it to 8 bits, or send a float .npy array in [0, 1]")
    return Upload(fmt, im.width, im.height, body, im)


def decode(body: bytes, max_pixels: int) -> DecodedImage:
    """Check and decode one upload (see the module doc for the rules)."""
    return open_upload(body, max_pixels).load()


def _load_image(im: Image.Image, fmt: str) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"the image is too large to decode: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise RequestError(400, f"the {fmt.upper()} data is corrupt or truncated: {e}") from None
    return DecodedImage(fmt, im, im.width, im.height)


def _depth(mode: str) -> str:
    return {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "32-bit float"}.get(
        mode, "not 8-bit")


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the ``.npy`` header alone, checked; nothing is allocated."""
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise RequestError(422, f".npy format version {version} is not supported; save with numpy.save")
        shape, _, dtype = read_header[version](f)
    except RequestError:
        raise
    except (ValueError, SyntaxError, EOFError, TypeError) as e:
        raise RequestError(400, f"the .npy header is corrupt: {e}") from None
    if dtype.hasobject:
        raise RequestError(422, ".npy arrays of Python objects are refused (they would need pickle); "
                           "send uint8 or float values")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise RequestError(422, f"the .npy array has shape {shape}; send one image as (H, W) or (H, W, C) with C 1 "
                           "or 3 (channels last)")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise RequestError(422, f"the .npy array has dtype {dtype}; send uint8 (0-255) or float values in [0, 1]")
    return shape, dtype


def _load_npy(body: bytes) -> DecodedImage:
    try:
        a = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise RequestError(400, f"the .npy data is corrupt or truncated: {e}") from None
    h, w = a.shape[:2]
    if a.dtype == np.uint8:
        # uint8 arrays take the PNG path, so channel conversion is Pillow's for both
        img = Image.fromarray(np.ascontiguousarray(a.reshape(h, w) if a.ndim == 3 and a.shape[2] == 1 else a))
        return DecodedImage("npy", img, w, h)
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise RequestError(422, "the float .npy image holds NaN or infinite values; send values in [0, 1]")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise RequestError(422, f"float .npy images must hold values in [0, 1] (unnormalised); got range "
                           f"[{a.min():.3g}, {a.max():.3g}]. Send uint8 0-255 or divide by 255")
    return DecodedImage("npy", a, w, h)
