"""Tests of pool import from IDX files, image folders and torchvision datasets."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distal.images import decode_image
from distal.pool import POOL_METADATA, PoolError, read_pool_info, validate_pool
from distal.pool_import import import_folder, import_idx, import_torchvision

pytestmark = pytest.mark.timeout(60)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def shared_data() -> Path:
    """Return the folder of real test data, from DISTAL_SHARED_DATA or beside the repository."""
    path = Path(os.environ.get("DISTAL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        raise FileNotFoundError(f"Test data folder {path} not found; set DISTAL_SHARED_DATA to its location.")
    return path


MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def mnist_arrays(tmp_path_factory):
    """The real MNIST test set as uint8 images [10000, 28, 28] and int64 labels [10000]."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    directory = tmp_path_factory.mktemp("mnist-raw")
    arrays = []
    for name, reader in ((MNIST_IMAGES, read_image_file), (MNIST_LABELS, read_label_file)):
        target = directory / name.removesuffix(".gz")
        with gzip.open(shared_data() / "mnist" / name, "rb") as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
        arrays.append(reader(str(target)).numpy())
    return arrays[0], arrays[1]


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (magic 0x08 = unsigned byte, then big-endian dimensions)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


def read_rows(info) -> dict[str, tuple[bytes, int]]:
    table = pq.ParquetDataset(list(info.shards)).read()
    return {
        sample_id: (image, label)
        for sample_id, image, label in zip(
            table.column("id").to_pylist(), table.column("image").to_pylist(), table.column("label").to_pylist()
        )
    }


def make_cifar_folder(root: Path, classes=("cat", "dog", "ship"), per_class=4) -> dict[str, Path]:
    """Copy a few real CIFAR-10 PNGs into root/<class>/ and return id -> source file."""
    copied = {}
    for class_name in classes:
        (root / class_name).mkdir(parents=True)
        for source in sorted((shared_data() / "cifar10" / "test" / class_name).glob("*.png"))[:per_class]:
            shutil.copyfile(source, root / class_name / source.name)
            copied[f"{class_name}/{source.stem}"] = source
    return copied


# --- IDX -----------------------------------------------------------------------------


def test_import_idx_real_mnist_split(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    data = shared_data() / "mnist"

    summary = import_idx(data / MNIST_IMAGES, data / MNIST_LABELS, str(tmp_path / "pool"),
                         eval_out=str(tmp_path / "eval"), eval_size=2000, seed=0)

    assert summary["pool_rows"] == 8000
    assert summary["eval_rows"] == 2000
    assert summary["pool"] == str(tmp_path / "pool")
    assert summary["eval"] == str(tmp_path / "eval")
    assert summary["classes"] == [str(digit) for digit in range(10)]
    assert summary["image_size"] == [28, 28]
    assert summary["channels"] == 1
    pool = read_rows(validate_pool(str(tmp_path / "pool"), require_label=True))
    evaluation = read_rows(validate_pool(str(tmp_path / "eval"), require_label=True))
    assert not pool.keys() & evaluation.keys()
    assert pool.keys() | evaluation.keys() == {f"mnist-t10k-{index:05d}" for index in range(10000)}
    expected_eval = {f"mnist-t10k-{index:05d}" for index in np.random.default_rng(0).permutation(10000)[:2000]}
    assert set(evaluation) == expected_eval
    for sample_id in ["mnist-t10k-00000", "mnist-t10k-09999", *sorted(evaluation)[:3]]:
        index = int(sample_id.rsplit("-", 1)[1])
        image, label = {**pool, **evaluation}[sample_id]
        assert label == labels[index]
        assert image.startswith(PNG_SIGNATURE)
        pixels, note = decode_image(image, 1, (28, 28))
        assert note is None
        np.testing.assert_array_equal(pixels[0], images[index])


def test_import_idx_pool_rows_in_file_order(tmp_path):
    data = shared_data() / "mnist"

    import_idx(data / MNIST_IMAGES, data / MNIST_LABELS, str(tmp_path / "pool"), eval_out=str(tmp_path / "eval"),
               eval_size=2000, seed=3, rows_per_shard=3000)

    info = read_pool_info(str(tmp_path / "pool"))
    ids = pq.ParquetDataset(list(info.shards)).read().column("id").to_pylist()
    assert ids == sorted(ids)
    assert [pq.read_metadata(shard).num_rows for shard in info.shards] == [3000, 3000, 2000]


def test_import_idx_uncompressed_subset(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    images_file = write_idx(tmp_path / "small-images-idx3-ubyte", images[:30])
    labels_file = write_idx(tmp_path / "small-labels-idx1-ubyte", labels[:30])

    summary = import_idx(images_file, labels_file, str(tmp_path / "pool"), rows_per_shard=8)

    assert summary["pool_rows"] == 30
    assert summary["eval_rows"] == 0
    rows = read_rows(read_pool_info(str(tmp_path / "pool")))
    assert sorted(rows) == [f"mnist-small-{index:05d}" for index in range(30)]
    assert [rows[f"mnist-small-{index:05d}"][1] for index in range(30)] == labels[:30].tolist()


def test_import_idx_count_mismatch(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    images_file = write_idx(tmp_path / "a-images-idx3-ubyte", images[:5])
    labels_file = write_idx(tmp_path / "a-labels-idx1-ubyte", labels[:4])

    with pytest.raises(PoolError, match="has 5 images, but labels file .* has 4 labels"):
        import_idx(images_file, labels_file, str(tmp_path / "pool"))
    assert not (tmp_path / "pool").exists()


def test_import_idx_missing_file(tmp_path):
    with pytest.raises(PoolError, match=f"IDX images file {tmp_path / 'absent.gz'} not found"):
        import_idx(tmp_path / "absent.gz", shared_data() / "mnist" / MNIST_LABELS, str(tmp_path / "pool"))


@pytest.mark.parametrize(
    "content", [b"garbage", gzip.compress(b"\x00\x00\x08\x03\x00\x00\x00\x05")], ids=["bad header", "truncated gzip"]
)
def test_import_idx_invalid_file(tmp_path, content):
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(content)

    with pytest.raises(PoolError, match="is not a valid IDX images file"):
        import_idx(tmp_path / "bad-images-idx3-ubyte", shared_data() / "mnist" / MNIST_LABELS, str(tmp_path / "p"))


def test_import_idx_labels_as_images_rejected(tmp_path):
    data = shared_data() / "mnist"

    with pytest.raises(PoolError, match="is not a valid IDX images file"):
        import_idx(data / MNIST_LABELS, data / MNIST_LABELS, str(tmp_path / "pool"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eval_size": 5}, "no eval_out is given"),
        ({"eval_out": "EVAL"}, "eval_size is 0"),
        ({"eval_out": "EVAL", "eval_size": 30}, "leaves no rows for the pool"),
        ({"eval_out": "POOL/eval", "eval_size": 3}, "separate directories"),
        ({"eval_out": "EVAL", "eval_size": -1}, "non-negative integer"),
        ({"workers": 0}, "workers to be a positive integer"),
    ],
)
def test_import_idx_bad_split(tmp_path, mnist_arrays, kwargs, match):
    images, labels = mnist_arrays
    images_file = write_idx(tmp_path / "s-images-idx3-ubyte", images[:30])
    labels_file = write_idx(tmp_path / "s-labels-idx1-ubyte", labels[:30])
    if "eval_out" in kwargs:
        kwargs["eval_out"] = kwargs["eval_out"].replace("POOL", str(tmp_path / "pool")).replace("EVAL", str(tmp_path / "e"))

    with pytest.raises(PoolError, match=match):
        import_idx(images_file, labels_file, str(tmp_path / "pool"), **kwargs)
    assert not (tmp_path / "pool").exists()


def test_import_idx_existing_pool_needs_overwrite(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    images_file = write_idx(tmp_path / "s-images-idx3-ubyte", images[:10])
    labels_file = write_idx(tmp_path / "s-labels-idx1-ubyte", labels[:10])
    import_idx(images_file, labels_file, str(tmp_path / "pool"))

    with pytest.raises(PoolError, match="already exists"):
        import_idx(images_file, labels_file, str(tmp_path / "other"), eval_out=str(tmp_path / "pool"), eval_size=2)
    assert not (tmp_path / "other").exists()
    assert import_idx(images_file, labels_file, str(tmp_path / "pool"), overwrite=True)["pool_rows"] == 10


# --- image folders ----------------------------------------------------------------------


def test_import_folder_real_cifar_subset(tmp_path):
    copied = make_cifar_folder(tmp_path / "images")

    summary = import_folder(tmp_path / "images", str(tmp_path / "pool"), eval_out=str(tmp_path / "eval"),
                            eval_size=3, seed=1, rows_per_shard=4)

    assert summary["classes"] == ["cat", "dog", "ship"]
    assert summary["image_size"] == [32, 32]
    assert summary["channels"] == 3
    assert summary["pool_rows"] == 9
    assert summary["eval_rows"] == 3
    assert summary["mismatched"] == {}
    rows = read_rows(validate_pool(str(tmp_path / "pool"), require_label=True))
    rows |= read_rows(validate_pool(str(tmp_path / "eval"), require_label=True))
    assert rows.keys() == copied.keys()
    for sample_id, source in copied.items():
        image, label = rows[sample_id]
        assert image == source.read_bytes()
        assert label == ["cat", "dog", "ship"].index(sample_id.split("/")[0])


def test_import_folder_formats_and_extensions(tmp_path):
    copied = make_cifar_folder(tmp_path / "images", classes=("cat", "dog"), per_class=2)
    pixels = np.asarray(Image.open(copied["cat/" + sorted(copied)[0].split("/")[1]]))  # [32, 32, 3]
    Image.fromarray(pixels).save(tmp_path / "images" / "cat" / "as_bitmap.BMP")
    Image.fromarray(pixels).save(tmp_path / "images" / "dog" / "as_jpeg.JPG", quality=90)
    (tmp_path / "images" / "dog" / "nested").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "dog" / "nested" / "deep.png")
    Image.fromarray(pixels).save(tmp_path / "images" / "dog" / ".hidden.png")
    (tmp_path / "images" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden").mkdir()

    summary = import_folder(tmp_path / "images", str(tmp_path / "pool"))

    assert summary["classes"] == ["cat", "dog"]
    rows = read_rows(read_pool_info(str(tmp_path / "pool")))
    assert set(rows) == set(copied) | {"cat/as_bitmap", "dog/as_jpeg"}
    bitmap, _ = rows["cat/as_bitmap"]
    assert bitmap.startswith(PNG_SIGNATURE)
    np.testing.assert_array_equal(decode_image(bitmap, 3, (32, 32))[0], pixels.transpose(2, 0, 1))
    assert rows["dog/as_jpeg"][0] == (tmp_path / "images" / "dog" / "as_jpeg.JPG").read_bytes()
    assert rows["dog/as_jpeg"][1] == 1


def test_import_folder_counts_mismatched_images(tmp_path):
    make_cifar_folder(tmp_path / "images", classes=("cat",), per_class=3)
    Image.new("RGB", (16, 12)).save(tmp_path / "images" / "cat" / "zz_small.png")
    Image.new("L", (32, 32)).save(tmp_path / "images" / "cat" / "zz_gray.png")

    summary = import_folder(tmp_path / "images", str(tmp_path / "pool"))

    assert summary["pool_rows"] == 5
    assert summary["mismatched"] == {"size 12x16": 1, "mode L": 1}


def test_import_real_test_split_as_eval_pool(tmp_path):
    summary = import_folder(shared_data() / "cifar10" / "test", str(tmp_path / "cifar10" / "eval"))

    info = validate_pool(str(tmp_path / "cifar10" / "eval"), require_label=True)
    assert summary["pool_rows"] == 10000
    assert info.num_rows == 10000
    assert len(info.shards) == 10
    assert info.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    labels = pq.ParquetDataset(list(info.shards)).read(columns=["label"]).column("label").to_numpy()
    assert np.bincount(labels).tolist() == [1000] * 10


def test_import_folder_missing_root(tmp_path):
    with pytest.raises(PoolError, match=f"Image folder {tmp_path / 'absent'} not found"):
        import_folder(tmp_path / "absent", str(tmp_path / "pool"))


def test_import_folder_without_class_folders(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "images" / "loose.png")

    with pytest.raises(PoolError, match="has no class subfolders. Expected .*/<class_name>/<image files>"):
        import_folder(tmp_path / "images", str(tmp_path / "pool"))


def test_import_folder_empty_class(tmp_path):
    make_cifar_folder(tmp_path / "images", classes=("cat",), per_class=1)
    (tmp_path / "images" / "dog").mkdir()
    (tmp_path / "images" / "dog" / "readme.txt").write_text("x")

    with pytest.raises(PoolError, match=f"Class folder {tmp_path / 'images' / 'dog'} has no image files"):
        import_folder(tmp_path / "images", str(tmp_path / "pool"))


@pytest.mark.parametrize("content", [b"", b"not a png", None], ids=["zero bytes", "garbage", "truncated"])
def test_import_folder_unreadable_image(tmp_path, content):
    copied = make_cifar_folder(tmp_path / "images", classes=("cat",), per_class=2)
    if content is None:
        content = next(iter(copied.values())).read_bytes()[:200]
    bad = tmp_path / "images" / "cat" / "zzz_bad.png"
    bad.write_bytes(content)

    with pytest.raises(PoolError, match=f"Image file {bad} cannot be decoded"):
        import_folder(tmp_path / "images", str(tmp_path / "pool"))
    assert not (tmp_path / "pool" / POOL_METADATA).exists()


def test_import_folder_parent_of_splits(tmp_path):
    make_cifar_folder(tmp_path / "data" / "train", classes=("cat",), per_class=1)
    make_cifar_folder(tmp_path / "data" / "test", classes=("cat",), per_class=1)

    with pytest.raises(PoolError, match=r"has no image files .* subfolders \['cat'\]: if they are the classes, pass"):
        import_folder(tmp_path / "data", str(tmp_path / "pool"))


def test_import_folder_duplicate_stems(tmp_path):
    make_cifar_folder(tmp_path / "images", classes=("cat",), per_class=1)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "cat" / "twin.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "cat" / "twin.jpg")

    with pytest.raises(PoolError, match="would both get the id 'cat/twin'"):
        import_folder(tmp_path / "images", str(tmp_path / "pool"))


# --- torchvision -------------------------------------------------------------------------


def test_import_torchvision_unknown_name(tmp_path):
    with pytest.raises(PoolError, match=r"Unknown torchvision dataset 'imagenet'. Expected one of \['cifar10'"):
        import_torchvision("imagenet", tmp_path, str(tmp_path / "pool"))


def test_import_torchvision_not_found(tmp_path):
    with pytest.raises(PoolError, match="MNIST not found or corrupted under"):
        import_torchvision("mnist", tmp_path, str(tmp_path / "pool"), download=False)


def test_import_torchvision_mnist_layout(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:20])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:20])
    write_idx(raw / "t10k-images-idx3-ubyte", images[20:25])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[20:25])

    summary = import_torchvision("MNIST", tmp_path, str(tmp_path / "pool"), train=True,
                                 eval_out=str(tmp_path / "eval"), eval_size=4)

    assert summary["pool_rows"] == 16
    assert summary["eval_rows"] == 4
    assert summary["classes"][0] == "0 - zero"
    rows = read_rows(read_pool_info(str(tmp_path / "pool"))) | read_rows(read_pool_info(str(tmp_path / "eval")))
    assert sorted(rows) == [f"mnist-train-{index:05d}" for index in range(20)]
    image, label = rows["mnist-train-00007"]
    assert label == labels[7]
    np.testing.assert_array_equal(decode_image(image, 1, (28, 28))[0][0], images[7])


def test_import_torchvision_cifar10_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    # Only the md5 checks are bypassed, because these batch files are built here from a few real images.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    sources = sorted((shared_data() / "cifar10" / "test" / "ship").glob("*.png"))[:12]
    pixels = np.stack([np.asarray(Image.open(source)) for source in sources])  # [12, 32, 32, 3]
    rows = pixels.transpose(0, 3, 1, 2).reshape(12, 3072)  # CIFAR batch layout: [n, 3 * 32 * 32], planes R, G, B
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for index in range(6):
        name = f"data_batch_{index + 1}" if index < 5 else "test_batch"
        entry = {"data": rows[2 * index : 2 * index + 2], "labels": [8, 8]}
        (folder / name).write_bytes(pickle.dumps(entry))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))

    summary = import_torchvision("cifar10", tmp_path, str(tmp_path / "pool"), train=True)

    assert summary["pool_rows"] == 10
    assert summary["channels"] == 3
    assert summary["image_size"] == [32, 32]
    assert summary["classes"] == classes
    imported = read_rows(read_pool_info(str(tmp_path / "pool")))
    assert sorted(imported) == [f"cifar10-train-{index:05d}" for index in range(10)]
    image, label = imported["cifar10-train-00003"]
    assert label == 8
    np.testing.assert_array_equal(decode_image(image, 3, (32, 32))[0], pixels[3].transpose(2, 0, 1))
