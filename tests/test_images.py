"""Tests of image decoding: modes, sizes, bad bytes and batches."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distal.images import DecodedBatch, ImageDecodeError, decode_batch, decode_image, encode_png

pytestmark = pytest.mark.timeout(60)


def shared_data() -> Path:
    """Return the folder of real test data, from DISTAL_SHARED_DATA or beside the repository."""
    path = Path(os.environ.get("DISTAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        raise FileNotFoundError(f"Test data folder {path} not found; set DISTAL_SHARED_DATA to its location.")
    return path


def cifar_png(name: str = "airplane") -> bytes:
    return sorted((shared_data() / "cifar10" / "test" / name).glob("*.png"))[0].read_bytes()


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    return image


def sixteen_bit_image() -> Image.Image:
    return Image.fromarray(np.full((4, 4), 51000, dtype=np.uint16))  # mode I;16


def pgm_sixteen_bit() -> bytes:
    return b"P5\n4 4\n65535\n" + np.full((4, 4), 51000, dtype=">u2").tobytes()  # opens as mode I


# (image bytes, channels, expected note, expected value of pixel [:, 0, 0])
MODE_CASES = {
    "L to 1": (encode(Image.new("L", (4, 4), 100)), 1, None, [100]),
    "L to 3": (encode(Image.new("L", (4, 4), 100)), 3, "L->RGB", [100, 100, 100]),
    "RGB to 3": (encode(Image.new("RGB", (4, 4), (10, 20, 30))), 3, None, [10, 20, 30]),
    # ITU-R 601-2 luma: (10 * 299 + 20 * 587 + 30 * 114) / 1000 = 18.15.
    "RGB to 1": (encode(Image.new("RGB", (4, 4), (10, 20, 30))), 1, "RGB->L", [18]),
    "RGBA to 3": (encode(Image.new("RGBA", (4, 4), (10, 20, 30, 40))), 3, "RGBA->RGB", [10, 20, 30]),
    "LA to 1": (encode(Image.new("LA", (4, 4), (70, 0))), 1, "LA->L", [70]),
    "P to 3": (encode(palette_image()), 3, "P->RGB", [10, 20, 30]),
    "P to 1": (encode(palette_image()), 1, "P->L", [18]),
    "I;16 to 1": (encode(sixteen_bit_image()), 1, "I;16->L", [51000 >> 8]),
    "I;16 to 3": (encode(sixteen_bit_image()), 3, "I;16->RGB", [199, 199, 199]),
    "I to 1": (pgm_sixteen_bit(), 1, "I->L", [199]),
    "CMYK to 3": (encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "TIFF"), 3, "CMYK->RGB", [255, 255, 255]),
    "1 to 1": (encode(Image.new("1", (4, 4), 1)), 1, "1->L", [255]),
    "JPEG RGB": (encode(Image.new("RGB", (4, 4), (0, 0, 0)), "JPEG"), 3, None, [0, 0, 0]),
}


@pytest.mark.parametrize("case", MODE_CASES.values(), ids=MODE_CASES.keys())
def test_decode_mode_conversion(case):
    data, channels, expected_note, expected_pixel = case

    pixels, note = decode_image(data, channels, (4, 4))

    assert pixels.dtype == np.uint8
    assert pixels.shape == (channels, 4, 4)
    assert note == expected_note
    assert pixels[:, 0, 0].tolist() == expected_pixel


def test_decode_palette_keeps_other_colours():
    pixels, _ = decode_image(encode(palette_image()), 3, (4, 4))

    assert pixels[:, 1, 1].tolist() == [200, 100, 50]


def test_decode_real_cifar_png():
    data = cifar_png()

    pixels, note = decode_image(data, 3, (32, 32))

    assert pixels.shape == (3, 32, 32)
    assert note is None
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize(
    "height, width, expected_note",
    [(30, 30, "resized 30x30->28x28"), (20, 30, "resized 20x30->28x28")],
)
def test_decode_resizes_other_sizes(height, width, expected_note):
    data = encode(Image.new("L", (width, height), 50))

    pixels, note = decode_image(data, 1, (28, 28))

    assert pixels.shape == (1, 28, 28)
    assert note == expected_note
    assert (pixels == 50).all()


def test_decode_mode_and_resize_notes_combine():
    data = encode(Image.new("RGBA", (8, 8), (1, 2, 3, 4)))

    _, note = decode_image(data, 3, (4, 4))

    assert note == "RGBA->RGB, resized 8x8->4x4"


@pytest.mark.parametrize("data", [None, b""], ids=["none", "zero bytes"])
def test_decode_empty_raises(data):
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, 3, (32, 32))

    assert caught.value.reason == "empty"


def test_decode_garbage_bytes_raises():
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"not an image at all", 3, (32, 32))

    assert caught.value.reason == "undecodable"


def test_decode_truncated_png_raises():
    data = cifar_png()

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2], 3, (32, 32))

    assert caught.value.reason == "undecodable"


def test_decode_truncated_jpeg_raises():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2], 3, (64, 64))

    assert caught.value.reason == "undecodable"


def test_decode_float_image_unsupported():
    data = encode(Image.fromarray(np.zeros((4, 4), dtype=np.float32)), "TIFF")

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, 1, (4, 4))

    assert caught.value.reason == "unsupported_mode"


@pytest.mark.parametrize("channels, size", [(2, (4, 4)), (3, (0, 4)), (3, (4,))])
def test_decode_invalid_arguments_raise(channels, size):
    with pytest.raises(ValueError, match="Expected"):
        decode_image(encode(Image.new("L", (4, 4))), channels, size)


def test_decode_batch_skips_and_groups():
    ids = ["gray", "empty", "rgb", "garbage", "rgba", "gray2"]
    images = [
        encode(Image.new("L", (4, 4), 9)),
        b"",
        encode(Image.new("RGB", (4, 4), (1, 2, 3))),
        b"\x89PNG\r\n\x1a\nbroken",
        encode(Image.new("RGBA", (4, 4), (4, 5, 6, 7))),
        encode(Image.new("L", (4, 4), 8)),
    ]

    batch = decode_batch(ids, images, 3, (4, 4))

    assert isinstance(batch, DecodedBatch)
    assert batch.pixels.shape == (4, 3, 4, 4)
    assert batch.ok_ids == ["gray", "rgb", "rgba", "gray2"]
    assert batch.skipped == [("empty", "empty"), ("garbage", "undecodable")]
    assert batch.conversions == {"L->RGB": ["gray", "gray2"], "RGBA->RGB": ["rgba"]}
    assert batch.pixels[2, :, 0, 0].tolist() == [4, 5, 6]


def test_decode_batch_all_bad_is_empty():
    batch = decode_batch(["a", "b"], [None, b"x"], 1, (28, 28))

    assert batch.pixels.shape == (0, 1, 28, 28)
    assert batch.pixels.dtype == np.uint8
    assert batch.ok_ids == []
    assert batch.skipped == [("a", "empty"), ("b", "undecodable")]


def test_decode_batch_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 ids and 1 images"):
        decode_batch(["a", "b"], [b""], 1, (4, 4))


@pytest.mark.parametrize(
    "shape, mode", [((5, 6), "L"), ((5, 6, 1), "L"), ((5, 6, 3), "RGB"), ((5, 6, 4), "RGBA")]
)
def test_encode_png_round_trip(shape, mode):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)

    data = encode_png(array)

    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), array.reshape(5, 6, -1).squeeze(-1) if mode == "L" else array)


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), np.zeros(4, dtype=np.uint8)]
)
def test_encode_png_rejects_bad_arrays(array):
    with pytest.raises(ValueError, match="Expected"):
        encode_png(array)
