"""Shared fixtures: one local Ray cluster per session and small pools of real MNIST images."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """Return the shared data folder: DISTAL_SHARED_DATA, else ../shared/data beside the repository."""
    override = os.environ.get("DISTAL_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "data"


def mnist_arrays(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read ``count`` real MNIST test images [n, 28, 28] and labels [n] with torchvision's readers."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    cache = Path(os.environ.get("PYTEST_MNIST_CACHE", "/tmp/distal-test-mnist"))
    cache.mkdir(parents=True, exist_ok=True)
    arrays = []
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        plain = cache / name
        if not plain.exists():
            temporary = cache / f"{name}.{os.getpid()}.tmp"
            with gzip.open(shared_data() / "mnist" / f"{name}.gz", "rb") as source, open(temporary, "wb") as target:
                shutil.copyfileobj(source, target)
            os.replace(temporary, plain)
        arrays.append(plain)
    images = read_image_file(str(arrays[0])).numpy()[offset : offset + count]
    labels = read_label_file(str(arrays[1])).numpy()[offset : offset + count]
    return images, labels


def write_mnist_pool(
    path: Path | str, count: int, offset: int = 0, rows_per_shard: int = 100, prefix: str = "mnist", overwrite: bool = False
):
    """Write a pool of ``count`` real MNIST images as PNG, ``rows_per_shard`` rows per shard."""
    from distal.images import encode_png
    from distal.pool import write_pool

    images, labels = mnist_arrays(count, offset)
    batch = pa.table(
        {
            "id": [f"{prefix}-{offset + i:05d}" for i in range(count)],
            "image": pa.array([encode_png(image) for image in images], pa.binary()),
            "label": pa.array(labels.astype(np.int64), pa.int64()),
        }
    )
    return write_pool(
        str(path),
        [batch],
        image_size=(28, 28),
        channels=1,
        classes=[str(digit) for digit in range(10)],
        source="MNIST test set (tests)",
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs for the whole session."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_pools(tmp_path_factory):
    """A 600-image pool (6 shards) and a 200-image held-out set of real MNIST images."""
    root = tmp_path_factory.mktemp("mnist")
    pool = write_mnist_pool(root / "pool", 600, offset=0, rows_per_shard=100)
    eval_pool = write_mnist_pool(root / "eval", 200, offset=600, rows_per_shard=100, prefix="mnist-eval")
    return pool, eval_pool


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with dummy credentials in the environment; yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields its name."""
    import uuid

    import s3fs

    name = f"distal-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(use_listings_cache=False).mkdir(name)
    return name
