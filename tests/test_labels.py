"""Tests of label import and the labeled set: formats, every rejected input, append-only files, relabels."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distal.labels
from conftest import write_mnist_pool
from distal.labels import (
    IMPORT_SCHEMA,
    LABELS_SCHEMA,
    LabelError,
    LabelImportError,
    current_labels,
    import_labels,
    label_files,
    pending_labels,
)

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2025, 3, 1, 9, 15, 30, 123456, tzinfo=timezone.utc)
POOL_SIZE = 300
# Ids mnist-00000 to mnist-00009 are in the initial labeled set, with label = last digit.
INITIAL_IDS = [f"mnist-{index:05d}" for index in range(10)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    """A pool of 300 real MNIST images in 3 shards: ids mnist-00000 to mnist-00299, classes "0" to "9"."""
    path = tmp_path_factory.mktemp("labels") / "pool"
    write_mnist_pool(path, POOL_SIZE, rows_per_shard=100)
    return str(path)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with labels/initial.parquet for the ids in INITIAL_IDS."""
    path = tmp_path / "run"
    (path / "labels").mkdir(parents=True)
    write_labels(path / "labels" / "initial.parquet", INITIAL_IDS, [index % 10 for index in range(10)], "oracle-initial")
    return path


def write_labels(path: Path, ids, labels, source: str, relabel=None) -> None:
    table = pa.table({"id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.int64()), "source": [source] * len(ids)})
    if relabel is not None:
        table = table.append_column("relabel", pa.array(relabel, pa.bool_()))
    pq.write_table(table, path)


def write_csv(path: Path, rows, header: str = "id,label") -> str:
    lines = [header] + [",".join(str(value) for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def listing(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "labels"))


def import_file(run_dir: Path, file: str, pool: str, **kwargs):
    return import_labels(str(run_dir), file, pool_uri=pool, now=kwargs.pop("now", NOW), **kwargs)


def rejected(run_dir: Path, file: str, pool: str, **kwargs) -> LabelImportError:
    """Import a file that must be rejected; check that no file appeared and return the error."""
    before = listing(run_dir)
    with pytest.raises(LabelImportError) as info:
        import_file(run_dir, file, pool, **kwargs)
    assert listing(run_dir) == before
    return info.value


# --- successful imports -------------------------------------------------------------------


def test_csv_import_writes_one_file(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 3), ("mnist-00200", 7)])

    result = import_file(run_dir, file, pool)

    name = "import-20250301T091530.123456Z-" + result.sha256[:12] + ".parquet"
    assert listing(run_dir) == sorted(["initial.parquet", name])
    assert result.label_file == f"labels/{name}"
    assert (result.already_imported, result.rows, result.added, result.relabeled, result.unchanged) == (False, 2, 2, 0, 0)
    assert result.source == file
    written = pq.read_table(run_dir / "labels" / name)
    assert written.schema == IMPORT_SCHEMA
    assert written.column("id").to_pylist() == ["mnist-00100", "mnist-00200"]
    assert written.column("label").to_pylist() == [3, 7]
    assert set(written.column("source").to_pylist()) == {file}
    assert set(written.column("sha256").to_pylist()) == {result.sha256}
    assert set(written.column("imported_at").to_pylist()) == {"2025-03-01T09:15:30.123456Z"}
    assert written.column("relabel").to_pylist() == [False, False]


@pytest.mark.parametrize("extension", ["csv", "jsonl", "ndjson", "parquet"])
def test_formats_give_same_labels(run_dir, pool, tmp_path, extension):
    ids, labels = ["mnist-00100", "mnist-00101", "mnist-00102"], [4, "9", 0]
    path = tmp_path / f"labels.{extension}"
    if extension == "csv":
        write_csv(path, zip(ids, labels))
    elif extension == "parquet":
        pq.write_table(pa.table({"id": ids, "label": pa.array([4, 9, 0], pa.int64()), "annotator": ["a", "b", "c"]}), path)
    else:
        path.write_text("".join(json.dumps({"id": i, "label": label, "annotator": "a"}) + "\n" for i, label in zip(ids, labels)))

    result = import_file(run_dir, str(path), pool)

    assert result.added == 3
    labeled = current_labels(str(run_dir)).to_pylist()
    assert labeled[10:] == [{"id": i, "label": label, "source": str(path)} for i, label in zip(ids, [4, 9, 0])]


def test_class_names_map_to_indexes(run_dir, pool, tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", "cat"), ("mnist-00101", 9), ("mnist-00102", " ship ")])

    import_file(run_dir, file, pool, classes=classes)

    labeled = current_labels(str(run_dir)).to_pylist()[10:]
    assert [row["label"] for row in labeled] == [3, 9, 8]


def test_pool_classes_are_default(run_dir, pool, tmp_path):
    file = tmp_path / "labels.jsonl"
    file.write_text('{"id": "mnist-00100", "label": "6"}\n{"id": "mnist-00101", "label": 6}\n')

    import_file(run_dir, str(file), pool)

    assert [row["label"] for row in current_labels(str(run_dir)).to_pylist()[10:]] == [6, 6]


def test_repeat_import_changes_nothing(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 3)])
    first = import_file(run_dir, file, pool)
    files = listing(run_dir)

    again = import_file(run_dir, file, pool, now=NOW + timedelta(days=2), relabel=True)

    assert again.already_imported
    assert again.label_file == first.label_file
    assert (again.rows, again.added, again.relabeled, again.unchanged) == (None, 0, 0, 0)
    assert listing(run_dir) == files


def test_same_label_is_unchanged(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00003", 3), ("mnist-00100", 1)])

    result = import_file(run_dir, file, pool)

    assert (result.added, result.relabeled, result.unchanged) == (1, 0, 1)
    written = pq.read_table(run_dir / result.label_file)
    assert written.column("id").to_pylist() == ["mnist-00100"]


def test_all_unchanged_writes_nothing(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00003", 3), ("mnist-00004", 4)])

    result = import_file(run_dir, file, pool)

    assert result.label_file is None
    assert (result.already_imported, result.added, result.unchanged) == (False, 0, 2)
    assert listing(run_dir) == ["initial.parquet"]


def test_relabel_rejected_without_flag(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00005", 8)])

    error = rejected(run_dir, file, pool)

    assert len(error.problems) == 1
    assert "row 2 (line 3), id 'mnist-00005': already labeled 5 in labels/initial.parquet, the file gives 8" in str(error)
    assert "relabel=True" in str(error)


def test_relabel_recorded_with_flag(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00005", 8)])

    result = import_file(run_dir, file, pool, relabel=True)

    assert (result.added, result.relabeled, result.unchanged) == (1, 1, 0)
    written = pq.read_table(run_dir / result.label_file)
    assert written.column("relabel").to_pylist() == [False, True]
    labeled = {row["id"]: row for row in current_labels(str(run_dir)).to_pylist()}
    assert labeled["mnist-00005"] == {"id": "mnist-00005", "label": 8, "source": file}
    assert labeled["mnist-00006"]["label"] == 6


def test_later_relabel_wins(run_dir, pool, tmp_path):
    first = write_csv(tmp_path / "first.csv", [("mnist-00100", 1)])
    second = write_csv(tmp_path / "second.csv", [("mnist-00100", 2)])
    third = write_csv(tmp_path / "third.csv", [("mnist-00100", 3), ("mnist-00101", 0)])
    import_file(run_dir, first, pool, now=NOW)
    import_file(run_dir, second, pool, now=NOW + timedelta(hours=1), relabel=True)
    import_file(run_dir, third, pool, now=NOW + timedelta(hours=2), relabel=True)

    labeled = current_labels(str(run_dir))

    assert labeled.schema == LABELS_SCHEMA
    assert labeled.column("id").to_pylist() == [*INITIAL_IDS, "mnist-00100", "mnist-00101"]
    assert labeled.to_pylist()[10] == {"id": "mnist-00100", "label": 3, "source": third}


def test_pool_lookup_spans_batches_and_shards(run_dir, pool, tmp_path, monkeypatch):
    monkeypatch.setattr(distal.labels, "POOL_ID_BATCH_ROWS", 16)
    file = write_csv(tmp_path / "labels.csv", [("mnist-00299", 1), ("mnist-00150", 2), ("mnist-00300", 3)])

    error = rejected(run_dir, file, pool)

    assert [(problem.row, problem.id) for problem in error.problems] == [(3, "mnist-00300")]


# --- rejected files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("zero.csv", b"", "the file is empty (no header and no rows)"),
        ("header.csv", b"id,label\n\n", "the file has a header but no data rows"),
        ("blank.jsonl", b"\n \n", "the file has no rows"),
    ],
)
def test_empty_file_rejected(run_dir, pool, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)

    error = rejected(run_dir, str(path), pool)

    assert f"has 1 problem; nothing was imported:\n  file: {expected}" in str(error)


def test_empty_parquet_rejected(run_dir, pool, tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), path)

    error = rejected(run_dir, str(path), pool)

    assert "file: the file has no rows" in str(error)


@pytest.mark.parametrize("column", ["id", "label"])
def test_missing_column_rejected(run_dir, pool, tmp_path, column):
    header = "id,lable" if column == "label" else "image_id,label"
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1)], header=header)

    error = rejected(run_dir, file, pool)

    assert f"file: no '{column}' column (found: {header.split(',')!r})" in str(error)


def test_missing_json_field_rejected(run_dir, pool, tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "mnist-00100", "class": 1}\n')

    error = rejected(run_dir, str(path), pool)

    assert "file: no row has the field 'label'" in str(error)


def test_semicolon_csv_gets_hint(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100;1",)], header="id;label")

    error = rejected(run_dir, file, pool)

    assert "seems to use ';' between columns" in str(error)


def test_empty_id_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("", 2), ("  ", 3)])

    error = rejected(run_dir, file, pool)

    assert "  row 2 (line 3): id is empty" in str(error)
    assert "  row 3 (line 4): id is empty" in str(error)


def test_null_id_and_label_rejected(run_dir, pool, tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "mnist-00100", "label": 1}\n{"id": null, "label": 2}\n{"id": "mnist-00102", "label": null}\n{"id": "mnist-00103"}\n')

    error = rejected(run_dir, str(path), pool)

    assert "  row 2: id is missing" in str(error)
    assert "  row 3, id 'mnist-00102': label is missing" in str(error)
    assert "  row 4, id 'mnist-00103': label is missing" in str(error)


def test_empty_label_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00101", "")])

    error = rejected(run_dir, file, pool)

    assert "row 2 (line 3), id 'mnist-00101': label is missing" in str(error)


def test_null_parquet_values_rejected(run_dir, pool, tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": ["mnist-00100", None, "mnist-00102"], "label": pa.array([1, 2, None], pa.int64())}), path)

    error = rejected(run_dir, str(path), pool)

    assert "  row 2: id is missing" in str(error)
    assert "  row 3, id 'mnist-00102': label is missing" in str(error)
    assert "Rows are counted from 1." in str(error)


def test_float_labels_must_be_whole(run_dir, pool, tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"id": ["mnist-00100", "mnist-00101", "mnist-00102"], "label": [1.0, float("nan"), 2.5]}), path)

    error = rejected(run_dir, str(path), pool)

    assert [(problem.row, problem.id) for problem in error.problems] == [(2, "mnist-00101"), (3, "mnist-00102")]
    assert "row 2, id 'mnist-00101': label is missing" in str(error)
    assert "row 3, id 'mnist-00102': label 2.5 is not a whole number" in str(error)


def test_unknown_id_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("cat/123", 2), ("mnist-00101", 3)])

    error = rejected(run_dir, file, pool)

    assert f"row 2 (line 3), id 'cat/123': unknown id, not in pool {pool}" in str(error)
    assert "None of the file's ids" not in str(error)


def test_all_unknown_ids_hint_pool(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("cifar-1", 1), ("cifar-2", 2)])

    error = rejected(run_dir, file, pool)

    assert f"None of the file's ids is in pool {pool}" in str(error)


def test_duplicate_row_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00101", 2), ("mnist-00100", 1)])

    error = rejected(run_dir, file, pool)

    assert "row 3 (line 4), id 'mnist-00100': duplicate of row 1 (same id and label)" in str(error)


def test_conflicting_labels_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00101", 2), ("mnist-00100", "4")])

    error = rejected(run_dir, file, pool, relabel=True)

    assert "row 3 (line 4), id 'mnist-00100': label 4 conflicts with label 1 in row 1" in str(error)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("10", "label '10' is out of range: there are 10 classes, so indexes are 0 to 9"),
        ("-1", "label '-1' is negative; class indexes start at 0"),
        ("doge", "label 'doge' is not a class (valid: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"),
        ("2.5", "label '2.5' is not a class"),
    ],
)
def test_label_outside_classes_rejected(run_dir, pool, tmp_path, label, expected):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00101", label)])

    error = rejected(run_dir, file, pool)

    assert f"row 2 (line 3), id 'mnist-00101': {expected}" in str(error)


def test_unknown_class_name_rejected(run_dir, pool, tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "bus"]
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "mnist-00100", "label": "cat"}\n{"id": "mnist-00101", "label": "doge"}\n')

    error = rejected(run_dir, str(path), pool, classes=classes)

    assert "row 2, id 'mnist-00101': label 'doge' is not a class (valid: airplane, automobile" in str(error)
    assert "truck, ... 1 more)" in str(error)


def test_ambiguous_numeric_class_name_rejected(run_dir, pool, tmp_path):
    # Class "0" has index 1, but read as an index "0" is class "1".
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", "0"), ("mnist-00101", 0)])

    error = rejected(run_dir, file, pool, classes=["1", "0"])

    assert "row 1 (line 2), id 'mnist-00100': label '0' is ambiguous: it names class index 1" in str(error)


def test_malformed_rows_rejected(run_dir, pool, tmp_path):
    csv_file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00101", "dog, small", "x")])
    jsonl_file = tmp_path / "labels.jsonl"
    jsonl_file.write_text('{"id": "mnist-00100", "label": 1}\n\n{"id": "mnist-00101", "label": 2\n[1, 2]\n')

    csv_error = rejected(run_dir, csv_file, pool)
    jsonl_error = rejected(run_dir, str(jsonl_file), pool)

    assert "row 2 (line 3), id 'mnist-00101': the row has 4 fields, but the header has 2 columns" in str(csv_error)
    assert "row 2 (line 3): not valid JSON" in str(jsonl_error)
    assert "row 3 (line 4): expected a JSON object with id and label, but got list" in str(jsonl_error)


@pytest.mark.parametrize(("name", "expected"), [("labels.txt", "expected the extension .csv"), ("absent.csv", "not found")])
def test_unreadable_file_rejected(run_dir, pool, tmp_path, name, expected):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("id,label\nmnist-00100,1\n")

    error = rejected(run_dir, str(path), pool)

    assert expected in str(error)


def test_one_bad_row_writes_nothing(run_dir, pool, tmp_path):
    rows = [(f"mnist-{index:05d}", index % 10) for index in range(100, 199)] + [("mnist-99999", 1)]
    file = write_csv(tmp_path / "labels.csv", rows)

    error = rejected(run_dir, file, pool)

    assert [(problem.row, problem.id) for problem in error.problems] == [(100, "mnist-99999")]
    assert str(error).startswith(f"Label file {file} has 1 problem; nothing was imported:\n")
    assert str(error).endswith("Fix the file and import it again.")
    assert current_labels(str(run_dir)).num_rows == 10


def test_problem_listing_is_capped(run_dir, pool, tmp_path):
    rows = [(f"unknown-{index}", 1) for index in range(30)] + [("mnist-00100", 1), ("mnist-00100", 1)]
    file = write_csv(tmp_path / "labels.csv", rows)

    error = rejected(run_dir, file, pool)

    assert len(error.problems) == 31
    lines = str(error).splitlines()
    assert lines[0] == f"Label file {file} has 31 problems; nothing was imported:"
    assert lines[20] == "  row 20 (line 21), id 'unknown-19': unknown id, not in pool " + pool
    assert lines[21] == "  ... and 11 more (10 unknown id, 1 duplicate row)"


def test_naive_time_rejected(run_dir, pool, tmp_path):
    file = write_csv(tmp_path / "labels.csv", [("mnist-00100", 1)])

    with pytest.raises(ValueError, match="timezone-aware"):
        import_file(run_dir, file, pool, now=datetime(2025, 3, 1))


# --- label files, the labeled set and pending labels -----------------------------------------


def test_label_files_in_application_order(run_dir, pool, tmp_path):
    labels = run_dir / "labels"
    write_labels(labels / "cycle-0010.parquet", ["mnist-00020"], [1], "oracle-cycle-0010")
    write_labels(labels / "cycle-0002.parquet", ["mnist-00021"], [2], "oracle-cycle-0002")
    (labels / "notes.parquet").write_bytes(b"")
    import_file(run_dir, write_csv(tmp_path / "late.csv", [("mnist-00100", 1)]), pool, now=NOW + timedelta(seconds=1))
    import_file(run_dir, write_csv(tmp_path / "early.csv", [("mnist-00101", 1)]), pool, now=NOW)

    files = label_files(str(run_dir))
    before_cycle = label_files(str(run_dir), before_cycle=10)

    assert files[:3] == ["labels/initial.parquet", "labels/cycle-0002.parquet", "labels/cycle-0010.parquet"]
    assert files[3].startswith("labels/import-20250301T091530.123456Z-")
    assert files[4].startswith("labels/import-20250301T091531.123456Z-")
    assert before_cycle == [files[0], files[1], files[3], files[4]]
    assert label_files(str(tmp_path / "new-run")) == []


def test_current_labels_from_given_files(run_dir, pool, tmp_path):
    write_labels(run_dir / "labels" / "cycle-0001.parquet", ["mnist-00020"], [1], "oracle-cycle-0001")
    files = label_files(str(run_dir))
    import_file(run_dir, write_csv(tmp_path / "labels.csv", [("mnist-00100", 1)]), pool)

    labeled = current_labels(str(run_dir), files=list(reversed(files)))

    assert labeled.column("id").to_pylist() == [*INITIAL_IDS, "mnist-00020"]
    with pytest.raises(ValueError, match="label_files"):
        current_labels(str(run_dir), files=["initial.parquet"])


def test_disagreeing_files_need_relabel(run_dir, pool, tmp_path):
    # Two imports that ran at the same time, each labeling mnist-00100 without relabel.
    labels = run_dir / "labels"
    write_labels(labels / "import-20250301T091530.000000Z-aaaaaaaaaaaa.parquet", ["mnist-00100"], [1], "a.csv", [False])
    write_labels(labels / "import-20250301T091530.000001Z-bbbbbbbbbbbb.parquet", ["mnist-00100"], [2], "b.csv", [False])

    with pytest.raises(LabelError, match="disagree on 1 id,") as info:
        current_labels(str(run_dir))
    error = rejected(run_dir, write_csv(tmp_path / "fix.csv", [("mnist-00100", 2)]), pool)
    import_file(run_dir, write_csv(tmp_path / "fix.csv", [("mnist-00100", 2)]), pool, relabel=True, now=NOW + timedelta(days=1))

    assert "id 'mnist-00100': 1 in labels/import-20250301T091530.000000Z-aaaaaaaaaaaa.parquet, 2 in" in str(info.value)
    assert "row 1 (line 2), id 'mnist-00100': label files disagree on this id" in str(error)
    assert current_labels(str(run_dir)).to_pylist()[10]["label"] == 2


def test_pending_labels_counts_selected(run_dir, pool, tmp_path):
    cycle = run_dir / "cycles" / "0001"
    cycle.mkdir(parents=True)
    pq.write_table(pa.table({"rank": [1, 2, 3], "id": ["mnist-00100", "mnist-00101", "mnist-00102"], "predicted_loss": [3.0, 2.0, 1.0]}), cycle / "selected.parquet")

    with pytest.raises(FileNotFoundError, match="Cycle 1 of .* is not complete"):
        pending_labels(str(run_dir), 1)
    (cycle / "_COMPLETE").write_text("{}")
    before = pending_labels(str(run_dir), 1)
    import_file(run_dir, write_csv(tmp_path / "labels.csv", [("mnist-00100", 1), ("mnist-00102", 2)]), pool)

    assert before == (3, 0)
    assert pending_labels(str(run_dir), 1) == (3, 2)


# --- S3 through a local moto server ----------------------------------------------------------


@pytest.fixture
def moto_s3(monkeypatch):
    """Start a moto S3 server on 127.0.0.1, point the AWS environment at it, and yield a bucket URI."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Cached file system instances would still point at an earlier endpoint.
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("distal-labels")
        yield "s3://distal-labels"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.mark.timeout(120)
def test_s3_run_directory(moto_s3, pool):
    import s3fs

    run_dir = f"{moto_s3}/runs/demo"
    file = f"{moto_s3}/incoming/labels.csv"
    fs = s3fs.S3FileSystem()
    fs.pipe_file(file.removeprefix("s3://"), b"id,label\nmnist-00100,1\nmnist-00101,2\n")
    bad = f"{moto_s3}/incoming/bad.csv"
    fs.pipe_file(bad.removeprefix("s3://"), b"id,label\nmnist-00100,1\nmnist-99999,2\n")

    with pytest.raises(LabelImportError, match="row 2 \\(line 3\\), id 'mnist-99999': unknown id"):
        import_labels(run_dir, bad, pool_uri=pool, now=NOW)
    assert label_files(run_dir) == []
    result = import_labels(run_dir, file, pool_uri=pool, now=NOW)
    again = import_labels(run_dir, file, pool_uri=pool, now=NOW + timedelta(hours=1))

    assert result.source == file
    assert label_files(run_dir) == [result.label_file]
    assert again.already_imported
    assert current_labels(run_dir).to_pylist() == [
        {"id": "mnist-00100", "label": 1, "source": file},
        {"id": "mnist-00101", "label": 2, "source": file},
    ]
