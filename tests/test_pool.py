"""Tests of the pool format: writing, reading, inference and validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distal.pool
from distal.images import encode_png
from distal.pool import (
    POOL_METADATA,
    POOL_SCHEMA,
    PoolError,
    PoolInfo,
    PoolWriter,
    check_pool_destination,
    open_fs,
    read_pool_info,
    validate_pool,
    write_pool,
)

pytestmark = pytest.mark.timeout(60)

IMAGE = encode_png(np.full((6, 5), 7, dtype=np.uint8))  # 6x5 grayscale


def make_table(ids, labels=None) -> pa.Table:
    columns = {"id": pa.array(ids, pa.string()), "image": pa.array([IMAGE] * len(ids), pa.binary())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns)


def write_small_pool(uri, count=25, rows_per_shard=10, labels=True, **kwargs) -> PoolInfo:
    ids = [f"s{index:03d}" for index in range(count)]
    table = make_table(ids, [index % 3 for index in range(count)] if labels else None)
    return write_pool(
        uri, [table.slice(0, 7), table.slice(7)], image_size=(6, 5), channels=1,
        classes=["a", "b", "c"] if labels else None, source="test", rows_per_shard=rows_per_shard, **kwargs,
    )


def write_shard(directory: Path, name: str, table: pa.Table) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / name)


# --- writing and reading ---------------------------------------------------------


def test_write_pool_shards_and_metadata(tmp_path):
    info = write_small_pool(tmp_path / "pool")

    assert info.num_rows == 25
    assert info.image_size == (6, 5)
    assert info.channels == 1
    assert info.classes == ("a", "b", "c")
    assert info.has_label
    assert info.path == str(tmp_path / "pool")
    assert info.shards == tuple(str(tmp_path / "pool" / f"part-0000{index}.parquet") for index in range(3))
    for shard, rows in zip(info.shards, [10, 10, 5]):
        metadata = pq.read_metadata(shard)
        assert metadata.num_rows == rows
        assert metadata.num_row_groups == 1
    assert pq.read_schema(info.shards[0]).types == POOL_SCHEMA.types

    metadata = json.loads((tmp_path / "pool" / POOL_METADATA).read_text())
    assert metadata["format_version"] == 1
    assert metadata["num_rows"] == 25
    assert metadata["image_size"] == [6, 5]
    assert metadata["shards"] == [
        {"file": "part-00000.parquet", "rows": 10},
        {"file": "part-00001.parquet", "rows": 10},
        {"file": "part-00002.parquet", "rows": 5},
    ]
    assert metadata["source"] == "test"


def test_write_pool_keeps_row_order(tmp_path):
    info = write_small_pool(tmp_path / "pool")

    ids = pq.ParquetDataset(list(info.shards)).read().column("id").to_pylist()

    assert ids == [f"s{index:03d}" for index in range(25)]


def test_read_pool_info_matches_written(tmp_path):
    written = write_small_pool(tmp_path / "pool")

    assert read_pool_info(str(tmp_path / "pool")) == written
    assert validate_pool(str(tmp_path / "pool"), require_label=True) == written


def test_write_pool_without_labels(tmp_path):
    info = write_small_pool(tmp_path / "pool", labels=False)

    assert not info.has_label
    assert info.classes is None
    assert pq.read_schema(info.shards[0]).names == ["id", "image"]
    assert validate_pool(str(tmp_path / "pool")) == info


def test_write_pool_leaves_no_temp_files(tmp_path):
    write_small_pool(tmp_path / "pool")

    assert sorted(os.listdir(tmp_path / "pool")) == [
        POOL_METADATA, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet",
    ]


def test_write_pool_rejects_complete_pool(tmp_path):
    write_small_pool(tmp_path / "pool")

    with pytest.raises(PoolError, match="already exists.*overwrite=True"):
        write_small_pool(tmp_path / "pool")


def test_write_pool_overwrite_replaces_shards(tmp_path):
    write_small_pool(tmp_path / "pool", count=25)

    info = write_small_pool(tmp_path / "pool", count=4, overwrite=True)

    assert info.num_rows == 4
    assert sorted(os.listdir(tmp_path / "pool")) == [POOL_METADATA, "part-00000.parquet"]


def test_write_pool_rewrites_incomplete_import(tmp_path):
    write_small_pool(tmp_path / "pool", count=25)
    (tmp_path / "pool" / POOL_METADATA).unlink()

    info = write_small_pool(tmp_path / "pool", count=4)

    assert info.num_rows == 4
    assert sorted(os.listdir(tmp_path / "pool")) == [POOL_METADATA, "part-00000.parquet"]


def test_write_pool_rejects_foreign_files(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "notes.txt").write_text("mine")

    with pytest.raises(PoolError, match=r"not part of a pool \(\['notes.txt'\]\)"):
        write_small_pool(tmp_path / "pool")
    assert (tmp_path / "pool" / "notes.txt").exists()


def test_check_pool_destination_rejects_file(tmp_path):
    (tmp_path / "file").write_text("x")

    with pytest.raises(PoolError, match="is a file"):
        check_pool_destination(str(tmp_path / "file"))


@pytest.mark.parametrize(
    "table, match",
    [
        (pa.table({"id": ["a"]}), "expected columns id, image"),
        (pa.table({"id": ["a"], "image": [IMAGE], "extra": [1]}), "expected columns id, image"),
        (pa.table({"id": pa.array([None, "b"], pa.string()), "image": [IMAGE, IMAGE]}), "a null id among rows 0 to 1"),
        (pa.table({"id": ["a", "b"], "image": pa.array([IMAGE, None], pa.binary())}), "a null image"),
        (make_table(["a", "b"], [0, 3]), r"range from 0 to 3, but they must be \[0, 2\]"),
        (make_table(["a", "b"], [-1, 0]), r"range from -1 to 0"),
        (pa.table({"id": ["a"], "image": [IMAGE], "label": pa.array([None], pa.int64())}), "a null label"),
        (pa.table({"id": ["a"], "image": ["text"], "label": ["x"]}), "expected id .string., image .binary."),
    ],
    ids=["missing image", "extra column", "null id", "null image", "label too large", "negative label",
         "null label", "label not integer"],
)
def test_write_pool_rejects_bad_rows(tmp_path, table, match):
    with pytest.raises(PoolError, match=match):
        write_pool(tmp_path / "pool", [table], image_size=(6, 5), channels=1, classes=["a", "b", "c"], source="t")
    assert not (tmp_path / "pool" / POOL_METADATA).exists()


def test_write_pool_rejects_duplicate_ids(tmp_path):
    table = make_table(["a", "b", "c", "a"])

    with pytest.raises(PoolError, match=r"id 'a' appears in shard part-00000.parquet \(row 0\) and in shard "
                                         r"part-00001.parquet \(row 1\)"):
        write_pool(tmp_path / "pool", [table], image_size=(6, 5), channels=1, classes=None, source="t",
                   rows_per_shard=2)
    assert os.listdir(tmp_path / "pool") == []


def test_write_pool_rejects_label_column_changes(tmp_path):
    with pytest.raises(PoolError, match="some batches have a label column"):
        write_pool(tmp_path / "pool", [make_table(["a"], [0]), make_table(["b"])], image_size=(6, 5), channels=1,
                   classes=None, source="t")


def test_write_pool_rejects_no_rows(tmp_path):
    with pytest.raises(PoolError, match="no rows were given"):
        write_pool(tmp_path / "pool", [], image_size=(6, 5), channels=1, classes=None, source="t")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 2}, "channels of 1 or 3"),
        ({"image_size": (0, 5)}, "image_size"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
    ],
)
def test_write_pool_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {"image_size": (6, 5), "channels": 1, "classes": None, "source": "t"} | kwargs

    with pytest.raises(PoolError, match=match):
        write_pool(tmp_path / "pool", [make_table(["a"])], **arguments)


def test_pool_writer_context_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with PoolWriter(tmp_path / "pool", image_size=(6, 5), channels=1, classes=None, source="t",
                        rows_per_shard=2) as writer:
            writer.write(make_table(["a", "b", "c"]))
            raise RuntimeError("stop")

    assert os.listdir(tmp_path / "pool") == []


def test_memory_filesystem_round_trip():
    uri = "memory://distal-test/pool"
    try:
        info = write_small_pool(uri)

        assert info.path == "memory:///distal-test/pool"
        assert info.shards[0] == "memory:///distal-test/pool/part-00000.parquet"
        assert validate_pool(uri, require_label=True) == info
        fs, root = open_fs(uri)
        assert f"{root}/{POOL_METADATA}" in fs.ls(root, detail=False)
    finally:
        fsspec.filesystem("memory").rm("/distal-test", recursive=True)


def test_open_fs_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    fs, path = open_fs("pools/mnist/")

    assert path == str(tmp_path / "pools" / "mnist")
    assert "file" in fs.protocol


# --- pools without metadata ---------------------------------------------------------


def test_read_pool_info_infers_from_shards(tmp_path):
    rgb = encode_png(np.zeros((9, 4, 3), dtype=np.uint8))
    write_shard(tmp_path / "own", "b.parquet", pa.table({"id": ["x"], "image": [rgb]}))
    write_shard(tmp_path / "own" / "nested", "a.parquet", pa.table({"id": ["y", "z"], "image": [b"", rgb]}))
    write_shard(tmp_path / "own", "_hidden.parquet", pa.table({"id": ["w"], "image": [rgb]}))

    info = read_pool_info(str(tmp_path / "own"))

    assert info.num_rows == 3
    assert info.shards == (str(tmp_path / "own" / "b.parquet"), str(tmp_path / "own" / "nested" / "a.parquet"))
    assert info.image_size == (9, 4)
    assert info.channels == 3
    assert info.classes is None
    assert not info.has_label


def test_read_pool_info_no_decodable_image(tmp_path):
    write_shard(tmp_path / "own", "a.parquet", pa.table({"id": ["x", "y"], "image": [b"", b"junk"]}))

    with pytest.raises(PoolError, match=r"none of the first 2 images of shard a.parquet decodes"):
        read_pool_info(str(tmp_path / "own"))


def test_read_pool_info_missing_directory(tmp_path):
    with pytest.raises(PoolError, match=f"Pool {tmp_path / 'absent'} not found"):
        read_pool_info(str(tmp_path / "absent"))


def test_read_pool_info_empty_directory(tmp_path):
    with pytest.raises(PoolError, match="no _distal_pool.json and no .*shard files"):
        read_pool_info(str(tmp_path))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not readable JSON"),
        ('{"format_version": 2}', "expected format_version 1 .* but got 2"),
        ('{"format_version": 1, "num_rows": 1}', "lacks the keys"),
        ("[1]", "expected a JSON object"),
    ],
)
def test_read_pool_info_bad_metadata(tmp_path, content, match):
    write_small_pool(tmp_path / "pool")
    (tmp_path / "pool" / POOL_METADATA).write_text(content)

    with pytest.raises(PoolError, match=match):
        read_pool_info(str(tmp_path / "pool"))


# --- validation ----------------------------------------------------------------------


def test_validate_missing_id_column(tmp_path):
    write_shard(tmp_path / "p", "part-00000.parquet", pa.table({"id": ["a"], "image": [IMAGE]}))
    write_shard(tmp_path / "p", "part-00001.parquet", pa.table({"name": ["b"], "image": [IMAGE]}))

    with pytest.raises(PoolError, match=r"shard part-00001.parquet has no 'id' column \(columns: \['name', 'image'\]\)"):
        validate_pool(str(tmp_path / "p"))


def test_validate_missing_image_column(tmp_path):
    write_small_pool(tmp_path / "p")
    pq.write_table(pa.table({"id": ["s010"], "label": [1]}), tmp_path / "p" / "part-00001.parquet")

    with pytest.raises(PoolError, match=r"shard part-00001.parquet has no 'image' column"):
        validate_pool(str(tmp_path / "p"))


def test_validate_wrong_column_type(tmp_path):
    write_shard(tmp_path / "p", "part-00000.parquet", pa.table({"id": [1, 2], "image": [IMAGE, IMAGE]}))

    with pytest.raises(PoolError, match="expected column 'id' of type string, but got int64"):
        validate_pool(str(tmp_path / "p"))


def test_validate_schema_differs_between_shards(tmp_path):
    write_shard(tmp_path / "p", "part-00000.parquet", make_table(["a"], [0]))
    write_shard(tmp_path / "p", "part-00001.parquet", make_table(["b"]))
    table = pa.table({"id": ["c"], "image": [IMAGE], "label": pa.array([0], pa.int32())})
    write_shard(tmp_path / "q", "part-00000.parquet", make_table(["a"], [0]))
    write_shard(tmp_path / "q", "part-00001.parquet", table)

    with pytest.raises(PoolError, match=r"shard part-00001.parquet differs from shard part-00000.parquet in columns "
                                        r"\['label'\] \(label: int64 vs None"):
        validate_pool(str(tmp_path / "p"))
    with pytest.raises(PoolError, match=r"in columns \['label'\] \(label: int64 vs int32"):
        validate_pool(str(tmp_path / "q"))


def test_validate_null_ids(tmp_path):
    ids = pa.array(["a"] * 17 + [None, "b", None], pa.string())
    write_shard(tmp_path / "p", "part-00000.parquet", make_table(["x"]))
    write_shard(tmp_path / "p", "part-00001.parquet", pa.table({"id": ids, "image": [IMAGE] * 20}))

    with pytest.raises(PoolError) as caught:
        validate_pool(str(tmp_path / "p"))

    message = str(caught.value)
    assert f"Pool {tmp_path / 'p'}" in message
    assert "shard part-00001.parquet has 2 rows with a null id (first at row 17)" in message


def test_validate_empty_id(tmp_path):
    write_shard(tmp_path / "p", "part-00000.parquet", make_table(["a", "", "b"]))

    with pytest.raises(PoolError, match=r"shard part-00000.parquet has 1 rows with an empty id \(first at row 1\)"):
        validate_pool(str(tmp_path / "p"))


def test_validate_duplicate_ids_across_shards(tmp_path):
    write_shard(tmp_path / "p", "part-00000.parquet", make_table(["a", "b", "c"]))
    write_shard(tmp_path / "p", "part-00001.parquet", make_table(["d", "e"]))
    write_shard(tmp_path / "p", "part-00002.parquet", make_table(["f", "g", "b"]))

    with pytest.raises(PoolError) as caught:
        validate_pool(str(tmp_path / "p"))

    message = str(caught.value)
    assert "id 'b' appears in shard part-00000.parquet (row 1) and in shard part-00002.parquet (row 2)" in message
    assert "ids that occur more than once: 1" in message


def test_validate_hash_collisions_without_duplicates(tmp_path, monkeypatch):
    # Every id hashes to 0, so the second pass must compare the real ids.
    monkeypatch.setattr(distal.pool.pd.util, "hash_array", lambda values: np.zeros(len(values), dtype=np.uint64))
    write_shard(tmp_path / "p", "part-00000.parquet", make_table(["a", "b"]))
    write_shard(tmp_path / "p", "part-00001.parquet", make_table(["c"]))

    assert validate_pool(str(tmp_path / "p")).num_rows == 3


def test_validate_many_ids_finds_one_duplicate(tmp_path):
    ids = [f"id-{index}" for index in range(60_000)]
    table = pa.table({"id": ids, "image": pa.array([IMAGE] * len(ids), pa.binary())})
    for index in range(3):
        write_shard(tmp_path / "p", f"part-0000{index}.parquet", table.slice(index * 20_000, 20_000))
    write_shard(tmp_path / "p", "part-00003.parquet", make_table(["new", "id-45678"]))

    with pytest.raises(PoolError, match=r"id 'id-45678' appears in shard part-00002.parquet \(row 5678\) and in "
                                        r"shard part-00003.parquet \(row 1\)"):
        validate_pool(str(tmp_path / "p"))


def test_validate_require_label_missing_column(tmp_path):
    write_small_pool(tmp_path / "p", labels=False)

    assert not validate_pool(str(tmp_path / "p")).has_label
    with pytest.raises(PoolError, match="shard part-00000.parquet has no 'label' column"):
        validate_pool(str(tmp_path / "p"), require_label=True)


def test_validate_require_label_null_and_range(tmp_path):
    labels = pa.array([0, None, 1], pa.int64())
    write_shard(tmp_path / "nulls", "part-00000.parquet", pa.table({"id": ["a", "b", "c"], "image": [IMAGE] * 3,
                                                                     "label": labels}))
    write_small_pool(tmp_path / "range")
    pq.write_table(make_table(["s010", "s011"], [2, 5]), tmp_path / "range" / "part-00001.parquet")

    with pytest.raises(PoolError, match=r"part-00000.parquet has 1 rows with a null label \(first at row 1\)"):
        validate_pool(str(tmp_path / "nulls"), require_label=True)
    with pytest.raises(PoolError, match=r"part-00001.parquet has 1 rows with a label out of range .*\[0, 2\]"):
        validate_pool(str(tmp_path / "range"), require_label=True)


def test_validate_shard_missing_from_disk(tmp_path):
    write_small_pool(tmp_path / "p")
    (tmp_path / "p" / "part-00001.parquet").unlink()

    with pytest.raises(PoolError, match="shard part-00001.parquet is listed in _distal_pool.json but not found"):
        validate_pool(str(tmp_path / "p"))


def test_validate_shard_rows_differ_from_metadata(tmp_path):
    write_small_pool(tmp_path / "p")
    pq.write_table(make_table(["s010"], [0]), tmp_path / "p" / "part-00001.parquet")

    with pytest.raises(PoolError, match="lists 10 rows for shard part-00001.parquet, but the shard has 1"):
        validate_pool(str(tmp_path / "p"))


def test_validate_unreadable_shard(tmp_path):
    write_small_pool(tmp_path / "p")
    (tmp_path / "p" / "part-00002.parquet").write_bytes(b"not parquet")

    with pytest.raises(PoolError, match="shard part-00002.parquet is not a readable Parquet file"):
        validate_pool(str(tmp_path / "p"))


# --- S3 through a local moto server ------------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch):
    """Start a moto S3 server on loopback and point fsspec's s3 protocol at it."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
        }
        monkeypatch.setitem(fsspec.config.conf, "s3", options)
        fsspec.filesystem("s3").mkdir("distal-test")
        yield "s3://distal-test"
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_s3_write_validate_overwrite(s3_bucket):
    uri = f"{s3_bucket}/pools/p"

    info = write_small_pool(uri)

    assert info.path == uri
    assert info.shards == tuple(f"{uri}/part-0000{index}.parquet" for index in range(3))
    assert validate_pool(uri, require_label=True) == info
    with pytest.raises(PoolError, match="already exists"):
        write_small_pool(uri)
    assert write_small_pool(uri, count=4, overwrite=True).num_rows == 4
    fs, root = open_fs(uri)
    assert sorted(fs.ls(root, detail=False, refresh=True)) == [f"{root}/{POOL_METADATA}", f"{root}/part-00000.parquet"]
    with pytest.raises(PoolError, match=f"Pool {s3_bucket}/absent not found"):
        read_pool_info(f"{s3_bucket}/absent")
