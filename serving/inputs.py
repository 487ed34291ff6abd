"""Request bodies -> images, checked before anything is decoded in full.

The service reads the raw body itself (BentoML's ``PIL.Image`` parameters answer non-image bytes
with a 500 and fetch URLs). The image rule (PNG, JPEG or ``.npy`` sniffed from the bytes; the pixel
limit checked from the header before decoding; 8-bit images only; truncated data refused; ``.npy``
without pickle) is :mod:`zoo.images`, the one ``zoo predict`` applies too. What is added here:

- a body that is a URL gets a 400 that says this service does not fetch URLs;
- large images are decoded no larger than the model needs (``reduce_to``: JPEG at 1/2-1/8 scale by
  libjpeg, PNG shrunk right after decoding), so one upload does not hold its full-size pixels while
  it waits for a batch;
- every refusal is a :class:`RequestError`, carrying the HTTP status and the message for the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from zoo import images
from zoo.images import FORMS, ImageError

__all__ = ["FORMS", "DecodedImage", "RequestError", "Upload", "check_pixels", "decode", "open_upload", "sniff"]


class RequestError(ImageError):
    """A request the service refuses: ``status`` is the HTTP status, the message says what to send instead."""


@dataclass(frozen=True)
class DecodedImage:
    """A checked, decoded upload.

    Attributes:
        format: ``png``, ``jpeg`` or ``npy``.
        image: a Pillow image in an 8-bit mode, or a float array (H, W[, C]) in [0, 1] (``.npy`` floats);
            possibly smaller than the upload when it was opened with ``reduce_to``.
        width, height: the upload's pixels (boxes are given in them).
    """

    format: str
    image: Image.Image | np.ndarray
    width: int
    height: int


def _request_error(e: ImageError) -> RequestError:
    return RequestError(e.status, e.message)


def sniff(body: bytes) -> str:
    """The body's format from its first bytes: ``png``, ``jpeg`` or ``npy``; anything else is refused."""
    if not body:
        raise RequestError(400, "empty request body: send the image bytes (" + FORMS + ") as the body")
    head = body[:16].lstrip()
    if head[:8].lower().startswith((b"http://", b"https://", b'"http://', b'"https://')):
        raise RequestError(400, "this service does not fetch URLs: send the image bytes themselves as the body "
                           "(curl --data-binary @image.png)")
    try:
        return images.sniff(body)
    except ImageError as e:
        raise _request_error(e) from None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an empty image (422) or one above ``max_pixels`` (413)."""
    try:
        images.check_pixels(width, height, max_pixels)
    except ImageError as e:
        raise _request_error(e) from None


@dataclass(frozen=True)
class Upload:
    """An upload whose format and size are known and checked; :meth:`load` decodes it (once)."""

    opened: images.OpenedImage

    @property
    def format(self) -> str:
        """``png``, ``jpeg`` or ``npy``."""
        return self.opened.format

    @property
    def width(self) -> int:
        """Pixels, as the header gives them."""
        return self.opened.width

    @property
    def height(self) -> int:
        """Pixels, as the header gives them."""
        return self.opened.height

    @property
    def pixels(self) -> int:
        """The upload's pixels (width x height)."""
        return self.opened.pixels

    @property
    def decode_pixels(self) -> int:
        """The pixels decoding allocates at once (fewer for a JPEG decoded at reduced scale)."""
        return self.opened.decode_pixels

    def load(self) -> DecodedImage:
        """Decode (once): the image, possibly reduced, with the upload's own width and height."""
        try:
            image = self.opened.load()
        except ImageError as e:
            raise _request_error(e) from None
        return DecodedImage(self.format, image, self.width, self.height)


def open_upload(body: bytes, max_pixels: int, reduce_to: int | None = None) -> Upload:
    """Sniff the format and read the header: cheap, nothing decoded yet, pixel limit checked.

    ``reduce_to``: decode images whose long side is at least twice this to a long side of at least
    this (see :meth:`zoo.images.OpenedImage.load`); None decodes at full size.
    """
    sniff(body)
    try:
        return Upload(images.open_image(body, max_pixels, reduce_to))
    except ImageError as e:
        raise _request_error(e) from None


def decode(body: bytes, max_pixels: int, reduce_to: int | None = None) -> DecodedImage:
    """Check and decode one upload (see the module doc for the rules)."""
    return open_upload(body, max_pixels, reduce_to).load()
