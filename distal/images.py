"""Decoding of pool images into fixed-size uint8 pixel arrays.

Pure functions without Ray or I/O, so Ray Data tasks can call them on each
batch and tests can call them on bytes made in memory.

Every image is brought to the pool's channel count and size:

- Mode: grayscale to 3 channels replicates the gray plane, and RGB to 1
  channel uses Pillow's ``L`` conversion (ITU-R 601-2 luma). Alpha (``RGBA``,
  ``LA``, ``PA``) is dropped. Palette images (``P``) are converted through
  RGB, or through RGBA when the palette has transparency. CMYK and other
  colour modes go through Pillow's RGB conversion. 16-bit samples (``I;16``, ``I;16B``,
  ``I;16L``) keep their high byte (value >> 8). Pillow 13 decodes PGM with a
  maxval above 255 and 32-bit integer TIFF to mode ``I``, and it already
  scales PGM samples to the 16-bit range, so mode ``I`` is treated as 16-bit
  too: values are clipped to [0, 65535], then shifted right by 8.
- Size: an image whose size differs from the pool's is resized with bilinear
  filtering, and its conversion note records it (``"resized 30x30->28x28"``,
  height x width). Resizing keeps such images in scoring, where rejecting
  them would drop them over a size difference. :func:`decode_batch` groups
  ids by note, so callers can count and report them.
- Multi-frame files (GIF, TIFF) contribute their first frame.

Images that cannot be used raise :class:`ImageDecodeError` with a short
``reason`` code, so a scoring job can skip the row and count it.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

# Modes whose content is one gray plane, before any alpha is dropped.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
TARGET_MODES = {1: "L", 3: "RGB"}

# Exceptions Pillow raises on damaged or unsupported data. UnidentifiedImageError
# and "image file is truncated" are OSErrors. Several plugins raise SyntaxError,
# struct.error or EOFError on bad headers, and zlib.error can escape PNG chunks.
PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageDecodeError(ValueError):
    """An image that cannot be turned into pixels.

    Attributes:
        reason: short code for counting skipped rows: ``empty`` (None or zero
            bytes), ``undecodable`` (Pillow cannot identify or fully load it),
            ``too_large`` (over Pillow's decompression-bomb limit) or
            ``unsupported_mode`` (for example 32-bit float images).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class DecodedBatch:
    """Pixels of the decodable images of a batch, in input order.

    Attributes:
        pixels: uint8 array [n_ok, channels, height, width].
        ok_ids: ids of the rows in ``pixels``, same order.
        skipped: (id, reason) for every row that could not be decoded.
        conversions: conversion note -> ids of the rows it applied to.
    """

    pixels: np.ndarray
    ok_ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, list[str]] = field(default_factory=dict)


def channels_for_mode(mode: str) -> int:
    """Return the pool channel count (1 or 3) that matches a Pillow mode."""
    return 1 if mode in GRAY_MODES else 3


def open_image(data: bytes | bytearray | memoryview | None) -> Image.Image:
    """Open and fully load encoded image bytes with Pillow.

    Loading here, not lazily, makes truncated files fail in this call.

    Raises:
        ImageDecodeError: reason ``empty``, ``undecodable`` or ``too_large``.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("Expected encoded image bytes, but got an empty value.", "empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"Image is too large to decode safely: {err}", "too_large") from err
    except PIL_DECODE_ERRORS as err:
        raise ImageDecodeError(
            f"Pillow cannot decode the {len(data)} image bytes: {err}", "undecodable"
        ) from err
    return image


def decode_image(
    data: bytes | bytearray | memoryview | None,
    channels: int,
    size: tuple[int, int],
) -> tuple[np.ndarray, str | None]:
    """Decode an encoded image into a uint8 array of the pool's shape.

    Args:
        data: encoded image bytes (PNG, JPEG or any format Pillow reads).
        channels: 1 (grayscale) or 3 (RGB).
        size: target (height, width).

    Returns:
        A uint8 array [channels, height, width] and a conversion note, for
        example ``"RGBA->RGB"`` or ``"L->RGB, resized 30x30->28x28"``, or None
        when the image already had the target mode and size.

    Raises:
        ImageDecodeError: the image is empty, undecodable, too large or in
            an unsupported mode; ``reason`` names the case.
        ValueError: ``channels`` or ``size`` is invalid.
    """
    target_mode = _target_mode(channels)
    height, width = _check_size(size)
    image = open_image(data)
    source_mode = image.mode

    converted = _convert_mode(image, target_mode)
    notes = [] if source_mode == target_mode else [f"{source_mode}->{target_mode}"]

    if converted.size != (width, height):
        old_width, old_height = converted.size
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        notes.append(f"resized {old_height}x{old_width}->{height}x{width}")

    pixels = np.asarray(converted, dtype=np.uint8)  # [H, W] or [H, W, 3]
    if channels == 1:
        pixels = pixels[np.newaxis, :, :]  # [1, H, W]
    else:
        pixels = pixels.transpose(2, 0, 1)  # [3, H, W]
    return np.ascontiguousarray(pixels), (", ".join(notes) or None)


def decode_batch(
    ids: Sequence[str],
    images: Sequence[bytes | bytearray | memoryview | None],
    channels: int,
    size: tuple[int, int],
) -> DecodedBatch:
    """Decode a batch of images, skipping and recording the ones that fail.

    Args:
        ids: sample ids, one per image.
        images: encoded image bytes; None or empty values are skipped.
        channels: 1 or 3.
        size: target (height, width).

    Returns:
        A :class:`DecodedBatch`; ``ok_ids`` and ``skipped`` together hold
        every input id once.

    Raises:
        ValueError: ``ids`` and ``images`` differ in length, or ``channels``
            or ``size`` is invalid.
    """
    if len(ids) != len(images):
        raise ValueError(f"Expected one id per image, but got {len(ids)} ids and {len(images)} images.")
    _target_mode(channels)
    height, width = _check_size(size)

    arrays: list[np.ndarray] = []
    result = DecodedBatch(pixels=np.empty((0, channels, height, width), dtype=np.uint8), ok_ids=[])
    for sample_id, data in zip(ids, images):
        try:
            pixels, note = decode_image(data, channels, (height, width))  # [C, H, W]
        except ImageDecodeError as err:
            result.skipped.append((sample_id, err.reason))
            continue
        arrays.append(pixels)
        result.ok_ids.append(sample_id)
        if note is not None:
            result.conversions.setdefault(note, []).append(sample_id)

    if arrays:
        result.pixels = np.stack(arrays)  # [n_ok, C, H, W]
    return result


def encode_png(array: np.ndarray) -> bytes:
    """Encode a uint8 array as PNG bytes.

    Args:
        array: uint8 [H, W] (grayscale) or [H, W, C] with C of 1 (grayscale),
            3 (RGB) or 4 (RGBA).

    Raises:
        ValueError: the dtype is not uint8 or the shape is not one of the above.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 array, but got dtype {array.dtype}.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # [H, W]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise ValueError(f"Expected shape [H, W] or [H, W, 1|3|4], but got {list(array.shape)}.")

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _target_mode(channels: int) -> str:
    try:
        return TARGET_MODES[channels]
    except (KeyError, TypeError) as err:
        raise ValueError(f"Expected channels of 1 or 3, but got {channels!r}.") from err


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in size):
        raise ValueError(f"Expected size as (height, width) of positive integers, but got {size!r}.")
    return int(size[0]), int(size[1])


def _convert_mode(image: Image.Image, target_mode: str) -> Image.Image:
    """Convert a loaded image to ``L`` or ``RGB`` following the module rules."""
    mode = image.mode
    if mode == target_mode:
        return image
    if mode in SIXTEEN_BIT_MODES:
        samples = np.asarray(image).astype(np.int64)  # [H, W]
        gray = Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8), mode="L")
        return gray if target_mode == "L" else _replicate_gray(gray)
    if mode == "F":
        raise ImageDecodeError(
            "Images of 32-bit float samples (mode F) have no fixed value range; convert them to 8-bit first.",
            "unsupported_mode",
        )
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "RGBa", "La"):
        image = image.convert("RGBA" if mode != "La" else "LA")

    if image.mode in ("1", "L", "LA"):
        gray = image.convert("L")
        return gray if target_mode == "L" else _replicate_gray(gray)
    try:
        rgb = image.convert("RGB")
    except ValueError as err:
        raise ImageDecodeError(f"Cannot convert mode {mode} to RGB: {err}", "unsupported_mode") from err
    return rgb if target_mode == "RGB" else rgb.convert("L")


def _replicate_gray(gray: Image.Image) -> Image.Image:
    return Image.merge("RGB", (gray, gray, gray))
