"""Synthetic benchmark pools: valid pool format, decodable images, reproducible for a seed."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from distal.images import decode_batch
from distal.pool import PoolError, validate_pool
from distal.synth import synthesize_pool

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("image_format", "channels", "size"), [("png", 3, 32), ("jpeg", 3, 24), ("png", 1, 28)])
def test_synthetic_pool_is_a_valid_decodable_pool(tmp_path, image_format, channels, size):
    info = synthesize_pool(str(tmp_path / "pool"), 250, image_size=size, channels=channels, image_format=image_format, rows_per_shard=100, workers=2)
    checked = validate_pool(str(tmp_path / "pool"), require_label=True)
    assert (checked.num_rows, len(checked.shards)) == (250, 3)
    assert checked.channels == channels
    assert tuple(checked.image_size) == (size, size)
    table = pq.read_table(info.shards[0])
    assert table.column("id").to_pylist()[:2] == ["synth-00000000", "synth-00000001"]
    decoded = decode_batch(table.column("id").to_pylist(), table.column("image").to_pylist(), channels, (size, size))
    assert decoded.pixels.shape == (100, channels, size, size)
    assert not decoded.skipped
    assert not decoded.conversions
    assert decoded.pixels.std() > 10  # images, not blank arrays
    assert set(table.column("label").to_pylist()) <= set(range(10))


def test_same_seed_gives_the_same_pool(tmp_path):
    first = synthesize_pool(str(tmp_path / "a"), 120, rows_per_shard=50, workers=2, seed=3)
    second = synthesize_pool(str(tmp_path / "b"), 120, rows_per_shard=50, workers=1, seed=3)
    other = synthesize_pool(str(tmp_path / "c"), 120, rows_per_shard=50, workers=2, seed=4)
    for a, b, c in zip(first.shards, second.shards, other.shards):
        assert pq.read_table(a).equals(pq.read_table(b))
        assert not pq.read_table(a).equals(pq.read_table(c))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rows": 0}, "rows"), ({"image_format": "gif"}, "image format"), ({"channels": 2}, "channels")],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    arguments = {"rows": 10, **kwargs}
    rows = arguments.pop("rows")
    with pytest.raises(PoolError, match=message):
        synthesize_pool(str(tmp_path / "pool"), rows, **arguments)


def test_existing_pool_needs_overwrite(tmp_path):
    synthesize_pool(str(tmp_path / "pool"), 10, workers=1)
    with pytest.raises(PoolError, match="overwrite"):
        synthesize_pool(str(tmp_path / "pool"), 10, workers=1)
