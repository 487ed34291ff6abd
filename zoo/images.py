"""The one rule for reading an image from bytes or a file; the server, ``zoo predict`` and the edge runner apply it.

- The format is sniffed from the first bytes: PNG, JPEG or a NumPy ``.npy`` array. File names and
  ``Content-Type`` headers are not trusted.
- The pixel count is read from the header and checked against ``max_pixels`` *before* decoding, so a
  small file that inflates to gigabytes (a decompression bomb) is refused without allocating it.
- 8-bit images only. Pillow reads a 16-bit PNG either as ``I;16``, whose conversion to ``L``/``RGB``
  clips every value above 255 to 255, or (16-bit RGB, RGBA, LA) as 8-bit by dropping the low byte;
  both are refused, with what to do instead.
- Truncated data is refused. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept False (a library
  may have set it process-wide), and a JPEG whose entropy-coded data is too short for the size its
  header claims is refused: libjpeg fills the missing rows with grey and reports only a warning, so
  Pillow would return a flat grey image.
- ``.npy`` arrays are read without pickle, as ``(H, W)`` or ``(H, W, C)`` with C 1 or 3, uint8 or
  float in [0, 1] (the forms ``ZooModel.predict`` takes).

Every refusal is an :class:`ImageError` with an HTTP-style ``status`` (400 corrupt or truncated, 413
too large, 415 not a supported or not an 8-bit image, 422 an array of the wrong shape, dtype or
range) and a message for the user, free of memory addresses and of numpy's ``allow_pickle`` advice.

``export/runner.py`` must stay one self-contained file, so it repeats this rule in its own code, with
the same messages (``tests/export/test_export_runner.py`` checks that they agree).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
FORMS = "PNG, JPEG or a NumPy .npy array"
DEFAULT_MAX_PIXELS = 4096 * 4096
# Pillow modes that convert to L/RGB without losing range; I;16, I and F are refused (see the module doc).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# Modes Image.reduce averages correctly; a palette index, for one, cannot be averaged.
REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
# JPEG frame markers (SOF0-SOF15 but DHT, JPG and DAC); arithmetic-coded frames can code a block in
# under a bit, so the length check below does not apply to them.
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# The end of a scan's entropy-coded data: a marker other than a stuffed 0x00, a restart or a fill byte.
JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


class ImageError(ValueError):
    """An image that is refused: ``status`` is an HTTP-style status, ``message`` says what to give instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def clean_message(e: BaseException | str) -> str:
    """A library's error message as a user may see it: one line, no memory addresses, no pickle advice.

    Pillow names its file object (``<_io.BytesIO object at 0x7f...>``) and numpy suggests
    ``allow_pickle=True``, which would make a server run code from its clients.
    """
    text = str(e) or type(e).__name__
    if "allow_pickle" in text or "pickle.load" in text:
        return "it holds Python objects, which would need pickle (refused)"
    return strip_addresses(text)[:300] or type(e).__name__


def strip_addresses(text: str) -> str:
    """``text`` on one line, without Python object reprs that name a memory address (``<... at 0x7f...>``)."""
    return " ".join(_ADDRESS.sub("", text).split())


def not_8bit(fmt: str, what: str) -> ImageError:
    """The refusal (415) of an image that is not 8-bit; ``what`` says what it is (``16-bit``)."""
    return ImageError(415, f"the {fmt.upper()} image is {what}; the models take 8-bit images: convert it to "
                      "8 bits, or give a float .npy array in [0, 1]")


def corrupt(fmt: str, e: BaseException | str) -> ImageError:
    """The refusal (400) of damaged data, with the decoder's reason, cleaned."""
    return ImageError(400, f"the {fmt.upper()} data is corrupt or truncated: {clean_message(e)}")


def sniff(data: bytes) -> str:
    """The format from the first bytes: ``png``, ``jpeg`` or ``npy``; anything else is refused (415)."""
    if not data:
        raise ImageError(400, f"the image is empty (0 bytes): expected {FORMS}")
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(NPY_MAGIC):
        return "npy"
    raise ImageError(415, f"the data is not a supported image: expected {FORMS} (checked from its first bytes, "
                     "not its name or Content-Type)")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an empty image (422) or one above ``max_pixels`` (413)."""
    if width < 1 or height < 1:
        raise ImageError(422, f"the image is empty ({width} x {height} pixels)")
    if width * height > max_pixels:
        raise ImageError(413, f"the image has {width} x {height} = {width * height:,} pixels; at most "
                         f"{max_pixels:,} are taken (resize it first: the model sees only its own input size)")


@dataclass
class OpenedImage:
    """An image whose format and size are known and checked, nothing decoded yet; :meth:`load` decodes it.

    Attributes:
        format: ``png``, ``jpeg`` or ``npy``.
        width, height: the pixels the header gives.
        decode_pixels: the pixels decoding will allocate; fewer than ``width * height`` for a JPEG
            opened with ``reduce_to`` (libjpeg decodes it at 1/2, 1/4 or 1/8 scale).
    """

    format: str
    width: int
    height: int
    decode_pixels: int
    data: bytes = field(repr=False)
    reduce_to: int | None = None
    _image: Image.Image | None = field(default=None, repr=False)  # Pillow's lazily opened image (png, jpeg)

    @property
    def pixels(self) -> int:
        """Width x height, as the header gives them."""
        return self.width * self.height

    def load(self) -> Image.Image | np.ndarray:
        """Decode: a Pillow image in an 8-bit mode, or a float32 array (H, W[, C]) in [0, 1] (float ``.npy``).

        Opened with ``reduce_to``, an image whose long side is at least twice that is shrunk by an
        integer factor (box filter) to a long side of at least ``reduce_to`` as it is decoded, and the
        full-size pixels are freed at once; ``width`` and ``height`` keep the original size.
        """
        if self.format == "npy":
            return _load_npy(self.data)
        assert self._image is not None
        im, self._image = self._image, None  # decoded once; the opened image is not kept alive here
        _load_pixels(im, self.format)
        return _reduce(im, self.reduce_to)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> OpenedImage:
    """Sniff the format and read the header: cheap, nothing decoded yet, every check but the decode's done.

    ``reduce_to`` (a long side in pixels) lets :meth:`OpenedImage.load` decode large images smaller.
    """
    fmt = sniff(data)
    if fmt == "npy":
        shape, _ = npy_header(data)
        check_pixels(shape[1], shape[0], max_pixels)
        return OpenedImage(fmt, shape[1], shape[0], shape[0] * shape[1], data)
    name = fmt.upper()
    if fmt == "png" and data[12:16] == b"IHDR" and len(data) >= 25 and data[24] == 16:
        # Read from IHDR: Pillow opens 16-bit RGB(A)/LA as 8-bit modes, so its mode would not tell.
        raise not_8bit(fmt, "16-bit")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's DecompressionBombWarning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[name])  # reads the header only
    except Image.DecompressionBombError:  # Pillow refuses more than 2 x MAX_IMAGE_PIXELS while reading the header
        raise ImageError(413, f"the image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; at most "
                         f"{max_pixels:,} are taken (resize it first: the model sees only its own input size)"
                         ) from None
    except MemoryError:
        raise ImageError(503, "not enough memory to read the image now; try again") from None
    except Exception as e:  # every parser error of a damaged file, whatever its type, is the file's fault
        raise corrupt(fmt, e) from None
    check_pixels(im.width, im.height, max_pixels)
    if im.mode not in EIGHT_BIT_MODES:
        raise not_8bit(fmt, _depth(im.mode))
    if fmt == "jpeg":
        problem = jpeg_data_problem(data)
        if problem:
            raise ImageError(400, f"the JPEG data is truncated: {problem}")
    w, h = im.size
    if fmt == "jpeg" and reduce_to and max(w, h) >= 2 * reduce_to:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale (whichever still gives a long side >= reduce_to),
        # so the full-size pixels are never allocated; im.size becomes the decoded size.
        s = reduce_to / max(w, h)
        im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
    return OpenedImage(fmt, w, h, im.width * im.height, data, reduce_to, im)


def read_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduce_to: int | None = None) -> Image.Image | np.ndarray:
    """Check and decode one image (see the module doc): a Pillow image in an 8-bit mode, or a float32
    array (H, W[, C]) in [0, 1] (a float ``.npy``). ``source`` is the bytes or a file's path."""
    data = source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    return open_image(bytes(data), max_pixels, reduce_to).load()


def jpeg_data_problem(data: bytes) -> str | None:
    """Why the JPEG's entropy-coded data cannot hold the image its frame header describes, or None.

    Huffman coding spends at least one bit on each 8 x 8 block's DC coefficient, so a scan shorter
    than a bit per block lacks data. Anything this walk cannot follow is left to the decoder.
    """
    try:
        i, n, frame, scanned = 2, len(data), None, 0
        while i + 4 <= n:
            if data[i] != 0xFF:
                return None
            m = data[i + 1]
            if m == 0xFF:  # fill byte
                i += 1
                continue
            if m == 0xD9:  # end of image
                break
            if 0xD0 <= m <= 0xD7 or m == 0x01:  # restart markers and TEM stand alone
                i += 2
                continue
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if m in JPEG_FRAMES and frame is None:
                frame = (m, data[i + 4:i + 2 + length])
            i += 2 + length
            if m == 0xDA and i < n:  # start of scan: its entropy-coded data runs to the next real marker
                end = JPEG_SCAN_END.search(data, i)
                stop = end.start() if end else n
                scanned += max(0, stop - i)
                i = stop
        if frame is None or frame[0] in JPEG_ARITHMETIC or len(frame[1]) < 6:
            return None
        seg = frame[1]
        height, width, ncomp = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
        comps = [(seg[6 + 3 * k + 1] >> 4, seg[6 + 3 * k + 1] & 15) for k in range(ncomp) if 8 + 3 * k < len(seg)]
        if not comps or height == 0 or any(hs == 0 or vs == 0 for hs, vs in comps):
            return None
        hmax, vmax = max(hs for hs, _ in comps), max(vs for _, vs in comps)
        blocks = sum(math.ceil(math.ceil(width * hs / hmax) / 8) * math.ceil(math.ceil(height * vs / vmax) / 8)
                     for hs, vs in comps)
        if scanned * 8 < blocks:
            return (f"its header says {width} x {height} pixels, but it holds {scanned:,} bytes of image data, "
                    f"less than the {math.ceil(blocks / 8):,} that many pixels need at the least")
    except Exception:  # a walk that fails proves nothing: the decoder has the last word
        return None
    return None


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the ``.npy`` header alone, checked; nothing is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
    except Exception as e:
        raise ImageError(400, f"the .npy header is corrupt: {clean_message(e)}") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ImageError(422, f".npy format version {version} is not supported; save it with numpy.save")
    try:
        # numpy parses the header with Python's tokenizer and ast: a damaged one raises whatever they
        # raise (tokenize.TokenError for a missing "}", among others), so every exception is the file's.
        shape, _, dtype = readers[version](f)
    except Exception as e:
        raise ImageError(400, f"the .npy header is corrupt: {clean_message(e)}") from None
    if dtype.hasobject:
        raise ImageError(422, ".npy arrays of Python objects are refused (they would need pickle); "
                         "give uint8 or float values")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ImageError(422, f"the .npy array has shape {shape}; give one image as (H, W) or (H, W, C) with C 1 "
                         "or 3 (channels last)")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise ImageError(422, f"the .npy array has dtype {dtype}; give uint8 (0-255) or float values in [0, 1]")
    return shape, dtype


# ----------------------------------------------------------------------------------------- decoding


def _load_pixels(im: Image.Image, fmt: str) -> None:
    # Set on every load, not once: another library may have turned it on for the whole process.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise ImageError(413, f"the image is too large to decode: {clean_message(e)}") from None
    except MemoryError:
        raise ImageError(503, "not enough memory to decode the image now; try again") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise corrupt(fmt, e) from None


def _reduce(im: Image.Image, reduce_to: int | None) -> Image.Image:
    """Shrink ``im`` by an integer factor to a long side >= ``reduce_to``, freeing the full-size pixels."""
    if not reduce_to or max(im.size) < 2 * reduce_to:
        return im
    full = im
    if im.mode not in REDUCIBLE_MODES:
        alpha = "A" in im.mode or "a" in im.mode or "transparency" in im.info
        im = im.convert("L" if im.mode == "1" else "RGBA" if alpha else "RGB")
        full.close()
    small = im.reduce(max(im.size) // reduce_to)
    im.close()  # the full-size pixels go now, not when the last reference to the image does
    return small


def _depth(mode: str) -> str:
    return {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "32-bit float"}.get(
        mode, f"mode {mode}, not 8-bit")


def _load_npy(data: bytes) -> Image.Image | np.ndarray:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:
        raise ImageError(503, "not enough memory to read the array now; try again") from None
    except Exception as e:
        raise ImageError(400, f"the .npy data is corrupt or truncated: {clean_message(e)}") from None
    h, w = a.shape[:2]
    if a.dtype == np.uint8:
        # uint8 arrays take the PNG path, so channel conversion is Pillow's for both
        return Image.fromarray(np.ascontiguousarray(a.reshape(h, w) if a.ndim == 3 and a.shape[2] == 1 else a))
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageError(422, "the float .npy image holds NaN or infinite values; give values in [0, 1]")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ImageError(422, f"float .npy images must hold values in [0, 1] (unnormalised); got range "
                         f"[{a.min():.3g}, {a.max():.3g}]. Give uint8 0-255 or divide by 255")
    return a
