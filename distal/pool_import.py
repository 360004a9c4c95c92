"""Import of image datasets into pools: MNIST-format IDX files, image folders
and torchvision datasets.

Each importer reads its source in chunks on a thread pool (file reads, Pillow
decoding and PNG encoding release the GIL), writes shards as chunks complete,
and can split off a seeded random evaluation pool in the same pass. Memory
stays bounded by the chunks in flight, except for IDX files and torchvision
datasets, which their readers load whole.

Both pools of a split get the same image size, channels and classes. An
existing test split is imported as an evaluation pool by importing it on its
own, for example ``import_folder("cifar10/test", "pools/cifar10/eval")``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from distal.images import ImageDecodeError, channels_for_mode, encode_png, open_image
from distal.pool import (
    DEFAULT_ROWS_PER_SHARD,
    PoolError,
    PoolInfo,
    PoolWriter,
    check_pool_destination,
    open_fs,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
GZIP_SIGNATURE = b"\x1f\x8b"
CHUNK_ROWS = 256
PROGRESS_SECONDS = 5.0
# Dataset names accepted by import_torchvision (lower case, without "-" or "_")
# and their torchvision.datasets classes.
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10"}


@dataclass
class _Chunk:
    """Rows of one chunk and what the importer noticed while loading them."""

    table: pa.Table
    # Mismatch kind ("size 30x30" or "mode L") -> number of images.
    mismatches: Counter = field(default_factory=Counter)
    # Mismatch kind -> first file it was seen in.
    examples: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Target:
    """Destinations, split and write settings of one import."""

    out: str
    eval_out: str | None
    eval_size: int
    seed: int
    rows_per_shard: int
    overwrite: bool
    workers: int | None


# --- public importers -----------------------------------------------------------


def import_idx(
    images_file: str | os.PathLike,
    labels_file: str | os.PathLike,
    out: str,
    *,
    eval_out: str | None = None,
    eval_size: int = 0,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    workers: int | None = None,
    id_prefix: str | None = None,
) -> dict:
    """Import MNIST-format IDX files (gzip-compressed or not) into a pool.

    The files are read with torchvision's ``read_image_file`` and
    ``read_label_file``; gzip files are decompressed to a temporary file
    first. Images are stored as PNG, classes are ``"0"`` up to the largest
    label, and ids are ``<prefix>-<index>`` with the zero-padded index of the
    image in the file (``mnist-t10k-00000``).

    Args:
        images_file: IDX file of uint8 images [N, H, W].
        labels_file: IDX file of uint8 labels [N].
        out: URI of the pool to write.
        eval_out: URI of the evaluation pool; required when eval_size > 0.
        eval_size: images moved to the evaluation pool by a seeded random
            split (``numpy.random.default_rng(seed).permutation``).
        seed: seed of the split.
        rows_per_shard: rows per shard file.
        overwrite: replace existing complete pools at ``out``/``eval_out``.
        workers: threads that encode images; None uses Python's default
            for ThreadPoolExecutor.
        id_prefix: id prefix; None derives ``mnist-<name>`` from the images
            file name up to ``-images`` (``t10k-images-idx3-ubyte.gz`` ->
            ``mnist-t10k``).

    Returns:
        Summary with the keys pool, pool_rows, eval, eval_rows, seconds,
        image_size, channels, classes.

    Raises:
        PoolError: a file is missing or not a valid IDX file, image and
            label counts differ, the split or a destination is invalid.
    """
    start = time.perf_counter()
    images_path = _existing_file(images_file, "IDX images file")
    labels_path = _existing_file(labels_file, "IDX labels file")
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = _read_idx(images_path, read_image_file, "images").numpy()  # [N, H, W] uint8
    labels = _read_idx(labels_path, read_label_file, "labels").numpy()  # [N] int64
    if len(images) != len(labels):
        raise PoolError(
            f"IDX images file {images_path} has {len(images)} images, but labels file {labels_path} has "
            f"{len(labels)} labels. Pass the labels file that belongs to these images."
        )
    if len(images) == 0:
        raise PoolError(f"IDX images file {images_path} has no images.")

    prefix = id_prefix if id_prefix is not None else _idx_id_prefix(images_path)
    classes = [str(label) for label in range(int(labels.max()) + 1)]
    source = f"IDX images={images_path} labels={labels_path}"
    return _import_arrays(
        images, labels, _numbered_ids(prefix, len(images)), classes, source,
        _Target(out, eval_out, eval_size, seed, rows_per_shard, overwrite, workers), start,
    )


def import_folder(
    root: str | os.PathLike,
    out: str,
    *,
    eval_out: str | None = None,
    eval_size: int = 0,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Import a local image folder ``root/<class_name>/<file>`` into a pool.

    Classes are the sorted names of the subfolders of ``root`` (hidden ones
    skipped) and a row's label is its class index. The image files (png,
    jpg, jpeg, bmp, webp, any case) directly in each class folder are
    imported. Other files and deeper folders are ignored with a warning, so
    passing the parent of ``train/`` and ``test/`` fails instead of
    importing two classes. Ids are ``<class_name>/<file name without
    extension>`` (``cat/img_001``). PNG and JPEG bytes are stored as
    they are on disk; other formats are re-encoded as PNG. Every image is
    decoded once, so an unreadable file fails the import by name.

    A pool has one image size and channel count, taken from the first file
    (in class and path order). Images that differ are still imported, and
    are resized or converted when decoded (see ``distal.images``); their
    counts are logged and returned.

    Args:
        root: the folder of class folders.
        out: URI of the pool to write.
        eval_out, eval_size, seed, rows_per_shard, overwrite, workers: as
            for :func:`import_idx`.

    Returns:
        Summary as for :func:`import_idx`, plus ``mismatched``: mismatch
        kind -> number of images whose size or mode differs from the pool's.

    Raises:
        PoolError: ``root`` is missing or has no class folders, a class
            folder has no images, two files map to one id, a file cannot be
            read or decoded, or the split or a destination is invalid.
    """
    start = time.perf_counter()
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise PoolError(f"Image folder {root_path} not found. Pass a folder that contains one folder per class.")
    target = _Target(out, eval_out, eval_size, seed, rows_per_shard, overwrite, workers)
    classes, files = _scan_folder(root_path)
    _check_target(target, len(files))

    first, _ = _read_image_file(files[0][1])
    height, width = first.height, first.width
    channels = channels_for_mode(first.mode)
    logger.info(
        "folder scanned root=%s classes=%d files=%d image_size=%dx%d channels=%d",
        root_path, len(classes), len(files), height, width, channels,
    )

    def load_chunk(chunk_start: int, chunk_stop: int) -> _Chunk:
        return _load_folder_chunk(files[chunk_start:chunk_stop], (height, width), channels)

    return _run_import(
        len(files), load_chunk, target,
        image_size=(height, width), channels=channels, classes=classes,
        source=f"image folder {root_path}", start=start,
    )


def import_torchvision(
    name: str,
    root: str | os.PathLike,
    out: str,
    *,
    train: bool = True,
    download: bool = False,
    eval_out: str | None = None,
    eval_size: int = 0,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
    workers: int | None = None,
) -> dict:
    """Import a torchvision dataset (MNIST, FashionMNIST or CIFAR10) into a pool.

    Images are stored as PNG, classes are the dataset's ``classes``, and ids
    are ``<name>-<train|test>-<index>`` (``cifar10-train-00000``).

    Args:
        name: ``mnist``, ``fashionmnist`` or ``cifar10`` (any case; ``-`` and
            ``_`` are ignored).
        root: torchvision's dataset root (the folder that contains
            ``MNIST/raw`` or ``cifar-10-batches-py``).
        out: URI of the pool to write.
        train: the training split if True, else the test split.
        download: let torchvision download the dataset when it is missing.
        eval_out, eval_size, seed, rows_per_shard, overwrite, workers: as
            for :func:`import_idx`.

    Returns:
        Summary as for :func:`import_idx`.

    Raises:
        PoolError: unknown name, dataset not found under ``root``, or an
            invalid split or destination.
    """
    start = time.perf_counter()
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise PoolError(
            f"Unknown torchvision dataset {name!r}. Expected one of {sorted(TORCHVISION_DATASETS)}; "
            "import other datasets with import_folder or import_idx."
        )
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, TORCHVISION_DATASETS[key])
    root_path = Path(root).resolve()
    try:
        dataset = dataset_class(str(root_path), train=train, download=download)
    except RuntimeError as err:
        raise PoolError(
            f"{dataset_class.__name__} not found or corrupted under {root_path}: {err}. Pass the folder "
            "that contains the dataset in torchvision's layout, or download=True on a machine with internet."
        ) from err

    images = np.asarray(dataset.data)  # [N, H, W] or [N, H, W, 3] uint8
    labels = np.asarray(dataset.targets, dtype=np.int64)  # [N]
    split = "train" if train else "test"
    source = f"torchvision {dataset_class.__name__} split={split} root={root_path}"
    return _import_arrays(
        images, labels, _numbered_ids(f"{key}-{split}", len(images)), list(dataset.classes), source,
        _Target(out, eval_out, eval_size, seed, rows_per_shard, overwrite, workers), start,
    )


# --- IDX files -----------------------------------------------------------------


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise PoolError(f"{what} {resolved} not found. Check the path.")
    return resolved


def _read_idx(path: Path, reader: Callable[[str], "torch.Tensor"], what: str) -> "torch.Tensor":  # noqa: F821
    """Read an IDX file with a torchvision reader, decompressing gzip first."""
    with path.open("rb") as file:
        compressed = file.read(2) == GZIP_SIGNATURE
    with tempfile.TemporaryDirectory(prefix="distal-idx-") as temp_dir:
        read_path = path
        try:
            if compressed:
                read_path = Path(temp_dir) / path.name.removesuffix(".gz")
                with gzip.open(path, "rb") as source, read_path.open("wb") as target:
                    shutil.copyfileobj(source, target)
            # torchvision's IDX parser signals bad headers with assert, wrong
            # types with TypeError and wrong sizes with ValueError/RuntimeError.
            return reader(str(read_path))
        except (AssertionError, TypeError, ValueError, RuntimeError, OSError, EOFError) as err:
            raise PoolError(
                f"{path} is not a valid IDX {what} file ({type(err).__name__}: {err}). "
                "Pass an MNIST-format file, gzip-compressed or not."
            ) from err


def _idx_id_prefix(images_path: Path) -> str:
    stem = images_path.name.lower().removesuffix(".gz")
    stem = stem.split("-images")[0] if "-images" in stem else stem.split(".")[0]
    return f"mnist-{stem}"


def _numbered_ids(prefix: str, count: int) -> list[str]:
    width = max(5, len(str(count - 1)))
    return [f"{prefix}-{index:0{width}d}" for index in range(count)]


def _import_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str],
    classes: Sequence[str],
    source: str,
    target: _Target,
    start: float,
) -> dict:
    """Import in-memory uint8 images [N, H, W] or [N, H, W, C] as PNG rows."""
    channels = 1 if images.ndim == 3 else images.shape[3]
    if channels not in (1, 3):
        raise PoolError(f"Expected grayscale or RGB images, but got {channels} channels ({source}).")

    def load_chunk(chunk_start: int, chunk_stop: int) -> _Chunk:
        encoded = [encode_png(image) for image in images[chunk_start:chunk_stop]]  # each [H, W(, C)]
        table = pa.table(
            {
                "id": pa.array(ids[chunk_start:chunk_stop], pa.string()),
                "image": pa.array(encoded, pa.binary()),
                "label": pa.array(labels[chunk_start:chunk_stop], pa.int64()),
            }
        )
        return _Chunk(table)

    return _run_import(
        len(images), load_chunk, target,
        image_size=(images.shape[1], images.shape[2]), channels=channels, classes=classes,
        source=source, start=start,
    )


# --- image folders ---------------------------------------------------------------


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, Path, int]]]:
    """Return the classes and (id, path, label) of every image file, sorted by class and name."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise PoolError(
            f"Image folder {root} has no class subfolders. Expected {root}/<class_name>/<image files>; "
            "put each class's images in a folder named after the class."
        )

    files: list[tuple[str, Path, int]] = []
    ignored = [entry.name for entry in os.scandir(root) if not entry.is_dir()]
    for label, class_name in enumerate(classes):
        class_files, class_ignored = _scan_class_folder(root, class_name)
        files.extend((sample_id, path, label) for sample_id, path in class_files)
        ignored.extend(class_ignored)

    if ignored:
        logger.warning(
            "entries that are not image files in a class folder are ignored root=%s count=%d first=%s",
            root, len(ignored), ignored[0],
        )
    return classes, files


def _scan_class_folder(root: Path, class_name: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """Return (id, path) of the image files directly in one class folder, and the entries ignored."""
    folder = root / class_name
    by_id: dict[str, Path] = {}
    ignored, subfolders = [], []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path = Path(entry.path)
        if entry.is_dir():
            subfolders.append(entry.name)
        if entry.name.startswith(".") or entry.is_dir() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored.append(f"{class_name}/{entry.name}")
            continue
        sample_id = f"{class_name}/{path.stem}"
        if sample_id in by_id:
            raise PoolError(
                f"Files {by_id[sample_id]} and {path} would both get the id {sample_id!r}. "
                "Ids are class/file name without extension; rename one of the files."
            )
        by_id[sample_id] = path

    if not by_id:
        hint = (
            f" It has subfolders {subfolders[:3]}: if they are the classes, pass {folder} as the image folder."
            if subfolders else " Add images or remove the folder."
        )
        raise PoolError(
            f"Class folder {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).{hint}"
        )
    return list(by_id.items()), ignored


def _read_image_file(path: Path) -> tuple[Image.Image, bytes]:
    """Read and decode one image file; return the loaded image and the file's bytes."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PoolError(f"Cannot read image file {path}: {err}. Check its permissions or remove it.") from err
    try:
        return open_image(data), data
    except ImageDecodeError as err:
        raise PoolError(
            f"Image file {path} cannot be decoded (reason: {err.reason}): {err}. Replace or remove the file."
        ) from err


def _load_folder_chunk(files: Sequence[tuple[str, Path, int]], size: tuple[int, int], channels: int) -> _Chunk:
    encoded = []
    mismatched_paths: dict[str, list[Path]] = {}
    for _, path, _ in files:
        image, data = _read_image_file(path)
        if not (data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE)):
            data = _reencode_png(image)
        encoded.append(data)
        if (image.height, image.width) != size:
            mismatched_paths.setdefault(f"size {image.height}x{image.width}", []).append(path)
        if channels_for_mode(image.mode) != channels:
            mismatched_paths.setdefault(f"mode {image.mode}", []).append(path)

    table = pa.table(
        {
            "id": pa.array([sample_id for sample_id, _, _ in files], pa.string()),
            "image": pa.array(encoded, pa.binary()),
            "label": pa.array([label for _, _, label in files], pa.int64()),
        }
    )
    return _Chunk(
        table,
        Counter({kind: len(paths) for kind, paths in mismatched_paths.items()}),
        {kind: str(paths[0]) for kind, paths in mismatched_paths.items()},
    )


def _reencode_png(image: Image.Image) -> bytes:
    if image.mode == "I":
        image = image.convert("I;16")  # PNG stores 16-bit but not 32-bit gray
    elif image.mode not in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- shared import loop --------------------------------------------------------------


def _check_target(target: _Target, total: int) -> None:
    """Check the split and both destinations before any rows are written."""
    if not isinstance(target.eval_size, int) or target.eval_size < 0:
        raise PoolError(f"Expected eval_size to be a non-negative integer, but got {target.eval_size!r}.")
    if target.eval_size > 0 and target.eval_out is None:
        raise PoolError(f"eval_size is {target.eval_size}, but no eval_out is given. Pass the evaluation pool's URI.")
    if target.eval_size == 0 and target.eval_out is not None:
        raise PoolError(f"eval_out is {target.eval_out}, but eval_size is 0. Pass eval_size > 0 or drop eval_out.")
    if target.eval_size >= total:
        raise PoolError(
            f"eval_size {target.eval_size} leaves no rows for the pool: the source has {total} images. "
            "Pass a smaller eval_size."
        )
    if target.workers is not None and (not isinstance(target.workers, int) or target.workers < 1):
        raise PoolError(f"Expected workers to be a positive integer or None, but got {target.workers!r}.")

    if target.eval_out is not None:
        out_path = open_fs(target.out)[1]
        eval_path = open_fs(target.eval_out)[1]
        if out_path == eval_path or eval_path.startswith(out_path + "/") or out_path.startswith(eval_path + "/"):
            raise PoolError(
                f"The pool {target.out} and the evaluation pool {target.eval_out} must be separate directories, "
                "neither inside the other."
            )
        check_pool_destination(target.eval_out, target.overwrite)
    check_pool_destination(target.out, target.overwrite)


def _eval_mask(total: int, eval_size: int, seed: int) -> np.ndarray:
    """Return a bool mask [total] that is True for the rows of the evaluation pool."""
    mask = np.zeros(total, dtype=bool)
    mask[np.random.default_rng(seed).permutation(total)[:eval_size]] = True
    return mask


def _run_import(
    total: int,
    load_chunk: Callable[[int, int], _Chunk],
    target: _Target,
    *,
    image_size: tuple[int, int],
    channels: int,
    classes: Sequence[str],
    source: str,
    start: float,
) -> dict:
    """Load chunks on a thread pool, in order, and route their rows to the pools."""
    _check_target(target, total)
    eval_mask = _eval_mask(total, target.eval_size, target.seed)
    split_note = f" split seed={target.seed} eval_size={target.eval_size}" if target.eval_size else ""

    def writer(uri: str, role: str) -> PoolWriter:
        return PoolWriter(
            uri, image_size=image_size, channels=channels, classes=classes,
            source=f"{source}{split_note} part={role}", rows_per_shard=target.rows_per_shard,
            overwrite=target.overwrite,
        )

    mismatches: Counter = Counter()
    examples: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        pool_writer = stack.enter_context(writer(target.out, "pool"))
        eval_writer = stack.enter_context(writer(target.eval_out, "eval")) if target.eval_size else None
        progress = _Progress(total)
        for chunk_start, chunk in _load_in_order(total, load_chunk, target.workers):
            in_eval = eval_mask[chunk_start:chunk_start + chunk.table.num_rows]  # [chunk rows] bool
            pool_writer.write(chunk.table.filter(pa.array(~in_eval)))
            if eval_writer is not None:
                eval_writer.write(chunk.table.filter(pa.array(in_eval)))
            mismatches.update(chunk.mismatches)
            for kind, path in chunk.examples.items():
                examples.setdefault(kind, path)
            progress.update(chunk.table.num_rows)
        pool_info = pool_writer.close()
        eval_info = eval_writer.close() if eval_writer is not None else None

    for kind, count in mismatches.items():
        logger.warning(
            "images differ from the pool's size %dx%d or %d channels and are converted at decode time "
            "kind=%s images=%d first=%s", image_size[0], image_size[1], channels, kind, count, examples[kind],
        )
    return _summary(pool_info, eval_info, dict(mismatches), time.perf_counter() - start)


def _load_in_order(total: int, load_chunk: Callable[[int, int], _Chunk], workers: int | None):
    """Yield (chunk start, chunk) in order, keeping a bounded number of chunks in flight."""
    # The default thread count is ThreadPoolExecutor's own (Python 3.8+).
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    max_in_flight = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distal-import") as executor:
        starts = iter(range(0, total, CHUNK_ROWS))
        in_flight: list[tuple[int, Future]] = []
        try:
            for chunk_start in starts:
                chunk_stop = min(chunk_start + CHUNK_ROWS, total)
                in_flight.append((chunk_start, executor.submit(load_chunk, chunk_start, chunk_stop)))
                if len(in_flight) >= max_in_flight:
                    done_start, future = in_flight.pop(0)
                    yield done_start, future.result()
            while in_flight:
                done_start, future = in_flight.pop(0)
                yield done_start, future.result()
        finally:
            for _, future in in_flight:
                future.cancel()


class _Progress:
    """Logs rows done, rows/s and ETA at most every PROGRESS_SECONDS."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.last_report = self.start

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last_report < PROGRESS_SECONDS and self.done < self.total:
            return
        self.last_report = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info("import [%d/%d] rows/s=%.0f eta=%.0fs", self.done, self.total, rate, eta)


def _summary(pool_info: PoolInfo, eval_info: PoolInfo | None, mismatched: dict[str, int], seconds: float) -> dict:
    summary = {
        "pool": pool_info.path,
        "pool_rows": pool_info.num_rows,
        "eval": eval_info.path if eval_info is not None else None,
        "eval_rows": eval_info.num_rows if eval_info is not None else 0,
        "seconds": round(seconds, 3),
        "image_size": list(pool_info.image_size),
        "channels": pool_info.channels,
        "classes": list(pool_info.classes) if pool_info.classes is not None else None,
        "mismatched": mismatched,
    }
    logger.info(
        "import done pool=%s pool_rows=%d eval=%s eval_rows=%d seconds=%.2f",
        summary["pool"], summary["pool_rows"], summary["eval"], summary["eval_rows"], seconds,
    )
    return summary
