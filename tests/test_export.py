"""Tests of the selection export: file contents, Label Studio tasks and their conversion back, label round trips, errors."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import distal.export
from conftest import mnist_arrays, write_mnist_pool
from distal.cli import main as cli_main
from distal.export import (
    ExportError,
    LabelStudioExportError,
    export_selection,
    labels_from_label_studio,
)
from distal.labels import LabelImportError, current_labels, import_labels
from distal.pool import write_pool

pytestmark = pytest.mark.timeout(60)

POOL_SIZE = 250
ROWS_PER_SHARD = 100
CLASSES = [str(digit) for digit in range(10)]
# (rank, id, predicted_loss): ids in all three shards, in an order unlike the pool's.
SELECTION = [
    (1, "mnist-00150", 3.75),
    (2, "mnist-00007", 2.5),
    (3, "mnist-00249", 2.5),
    (4, "mnist-00100", 0.1 + 0.2),
    (5, "mnist-00099", 0.015625),
]
# Shard index and 0-based row of each id above, for shards of 100 rows.
LOCATIONS = {"mnist-00150": (1, 50), "mnist-00007": (0, 7), "mnist-00249": (2, 49), "mnist-00100": (1, 0), "mnist-00099": (0, 99)}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    """250 real MNIST images in 3 shards (100, 100, 50 rows): ids mnist-00000 to mnist-00249, classes "0" to "9"."""
    path = tmp_path_factory.mktemp("export") / "pool"
    write_mnist_pool(path, POOL_SIZE, rows_per_shard=ROWS_PER_SHARD)
    return str(path)


@pytest.fixture
def run_dir(tmp_path, pool) -> Path:
    """A run directory whose cycle 1 is complete and selected SELECTION from ``pool``."""
    path = tmp_path / "run"
    make_cycle(path, 1, SELECTION, pool)
    (path / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(path), "pool": {"path": pool}}))
    return path


def make_cycle(run: Path, cycle: int, selection, pool: str, complete: bool = True) -> Path:
    """Write a cycle's selected.parquet, manifest.json and, when complete, _COMPLETE, as a finished job leaves them."""
    folder = run / "cycles" / f"{cycle:04d}"
    folder.mkdir(parents=True)
    ranks, ids, losses = zip(*selection) if selection else ((), (), ())
    table = pa.table(
        {"rank": pa.array(ranks, pa.int64()), "id": pa.array(ids, pa.string()), "predicted_loss": pa.array(losses, pa.float64())}
    )
    pq.write_table(table, folder / "selected.parquet")
    (folder / "manifest.json").write_text(json.dumps({"cycle": cycle, "pool": {"path": pool}, "selected": list(ids)}))
    if complete:
        (folder / "_COMPLETE").write_text(json.dumps({"cycle": cycle}))
    return folder


def shard_uri(pool: str, index: int) -> str:
    return os.path.join(pool, f"part-{index:05d}.parquet")


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def mnist_label(sample_id: str) -> int:
    index = int(sample_id.rsplit("-", 1)[1])
    return int(mnist_arrays(index + 1)[1][index])


def fill_labels(csv_path, out_path: Path, label_of) -> str:
    """Fill the label column of an export CSV the way a spreadsheet user does, keeping every other column."""
    rows = read_csv(csv_path)
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "label": label_of(row["id"])})
    return str(out_path)


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def write_small_pool(path: str, ids: list[str], images: list[bytes]) -> None:
    """Write a one-shard pool of 8x8 grayscale images without labels."""
    table = pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary())})
    write_pool(path, [table], image_size=(8, 8), channels=1, classes=None, source="tests")


# --- file contents ----------------------------------------------------------------------------


def test_export_writes_three_files(run_dir):
    written = export_selection(str(run_dir), 1)

    folder = run_dir / "cycles" / "0001" / "export"
    assert written == {
        "csv": str(folder / "selected.csv"),
        "jsonl": str(folder / "selected.jsonl"),
        "label_studio": str(folder / "label-studio.json"),
    }
    assert files_in(folder) == ["label-studio.json", "selected.csv", "selected.jsonl"]


def test_csv_rows_locate_each_id(run_dir, pool):
    written = export_selection(str(run_dir), 1)
    text = Path(written["csv"]).read_text(encoding="utf-8")
    rows = read_csv(written["csv"])

    assert text.splitlines()[0] == "id,rank,predicted_loss,shard,row,label"
    assert [row["id"] for row in rows] == [sample_id for _, sample_id, _ in SELECTION]
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4, 5]
    assert [float(row["predicted_loss"]) for row in rows] == [loss for _, _, loss in SELECTION]
    for row in rows:
        shard, position = LOCATIONS[row["id"]]
        assert row["shard"] == shard_uri(pool, shard)
        assert int(row["row"]) == position
        assert row["label"] == ""


def test_csv_row_points_at_the_image(run_dir):
    rows = read_csv(export_selection(str(run_dir), 1)["csv"])

    for row in rows:
        shard = pq.read_table(row["shard"], columns=["id"])
        assert shard.column("id")[int(row["row"])].as_py() == row["id"]


def test_jsonl_matches_csv(run_dir, pool):
    written = export_selection(str(run_dir), 1)
    records = read_jsonl(written["jsonl"])

    assert [set(record) for record in records] == [{"id", "rank", "predicted_loss", "shard", "row"}] * len(SELECTION)
    assert [(record["rank"], record["id"], record["predicted_loss"]) for record in records] == SELECTION
    assert records[3]["predicted_loss"] == 0.1 + 0.2
    for record in records:
        assert (record["shard"], record["row"]) == (shard_uri(pool, LOCATIONS[record["id"]][0]), LOCATIONS[record["id"]][1])


def test_label_studio_tasks_embed_pool_pixels(run_dir):
    tasks = json.loads(Path(export_selection(str(run_dir), 1)["label_studio"]).read_text(encoding="utf-8"))
    images, _ = mnist_arrays(POOL_SIZE)

    assert [set(task) for task in tasks] == [{"data"}] * len(SELECTION)
    assert [(task["data"]["rank"], task["data"]["distal_id"], task["data"]["predicted_loss"]) for task in tasks] == SELECTION
    for task in tasks:
        prefix, encoded = task["data"]["image"].split(",", 1)
        assert prefix == "data:image/png;base64"
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))))
        index = int(task["data"]["distal_id"].rsplit("-", 1)[1])
        np.testing.assert_array_equal(decoded, images[index])


def test_image_uri_base_sets_urls(run_dir):
    written = export_selection(str(run_dir), 1, image_uri_base="s3://bucket/images/")
    rows = read_csv(written["csv"])
    records = read_jsonl(written["jsonl"])
    tasks = json.loads(Path(written["label_studio"]).read_text(encoding="utf-8"))

    expected = [f"s3://bucket/images/{sample_id}.png" for _, sample_id, _ in SELECTION]
    assert list(rows[0]) == ["id", "rank", "predicted_loss", "shard", "row", "image_uri", "label"]
    assert [row["image_uri"] for row in rows] == expected
    assert [record["image_uri"] for record in records] == expected
    assert [task["data"]["image"] for task in tasks] == expected


def test_embed_images_overrides_base_for_label_studio(run_dir):
    written = export_selection(str(run_dir), 1, image_uri_base="s3://bucket/images/", embed_images=True)
    tasks = json.loads(Path(written["label_studio"]).read_text(encoding="utf-8"))

    assert all(task["data"]["image"].startswith("data:image/png;base64,") for task in tasks)
    assert read_csv(written["csv"])[0]["image_uri"] == "s3://bucket/images/mnist-00150.png"


def test_https_base_percent_encodes_ids(tmp_path):
    pool = str(tmp_path / "pool")
    ids = ["cat/a b#1", "dog/ü"]
    images = [encode(np.full((8, 8), 100, np.uint8), "PNG"), encode(np.full((8, 8), 200, np.uint8), "PNG")]
    write_small_pool(pool, ids, images)
    run = tmp_path / "run"
    make_cycle(run, 1, [(1, ids[0], 2.0), (2, ids[1], 1.0)], pool)

    https = read_csv(export_selection(str(run), 1, image_uri_base="https://cdn.example.com/img/")["csv"])
    plain = read_csv(export_selection(str(run), 1, image_uri_base="s3://bucket/img/")["csv"])

    assert [row["image_uri"] for row in https] == ["https://cdn.example.com/img/cat/a%20b%231.png", "https://cdn.example.com/img/dog/%C3%BC.png"]
    assert [row["image_uri"] for row in plain] == ["s3://bucket/img/cat/a b#1.png", "s3://bucket/img/dog/ü.png"]
    assert [row["id"] for row in https] == ids


def test_jpeg_pool_gives_jpg_and_jpeg_mime(tmp_path):
    pool = str(tmp_path / "pool")
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    jpeg = encode(pixels, "JPEG")
    write_small_pool(pool, ["a", "b"], [jpeg, encode(pixels, "PNG")])
    run = tmp_path / "run"
    make_cycle(run, 1, [(1, "a", 1.0), (2, "b", 0.5)], pool)

    written = export_selection(str(run), 1, image_uri_base="https://x.example/")
    uris = [row["image_uri"] for row in read_csv(written["csv"])]
    embedded = export_selection(str(run), 1)
    tasks = json.loads(Path(embedded["label_studio"]).read_text(encoding="utf-8"))

    assert uris == ["https://x.example/a.jpg", "https://x.example/b.png"]
    assert tasks[0]["data"]["image"] == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    assert tasks[1]["data"]["image"].startswith("data:image/png;base64,")


def test_empty_selection_writes_headers_only(tmp_path, pool):
    run = tmp_path / "run"
    make_cycle(run, 1, [], pool)

    written = export_selection(str(run), 1)

    assert Path(written["csv"]).read_text(encoding="utf-8").splitlines() == ["id,rank,predicted_loss,shard,row,label"]
    assert Path(written["jsonl"]).read_bytes() == b""
    assert json.loads(Path(written["label_studio"]).read_text(encoding="utf-8")) == []


def test_out_dir_elsewhere(run_dir, tmp_path):
    out = tmp_path / "handoff" / "batch-1"

    written = export_selection(str(run_dir), 1, out_dir=str(out))

    assert files_in(out) == ["label-studio.json", "selected.csv", "selected.jsonl"]
    assert written["csv"] == str(out / "selected.csv")
    assert not (run_dir / "cycles" / "0001" / "export").exists()


def test_export_again_replaces_files(run_dir):
    first = export_selection(str(run_dir), 1, image_uri_base="s3://bucket/images/")
    export_selection(str(run_dir), 1)

    assert "image_uri" not in read_csv(first["csv"])[0]
    assert files_in(run_dir / "cycles" / "0001" / "export") == ["label-studio.json", "selected.csv", "selected.jsonl"]


def test_large_embedded_file_warns(run_dir, monkeypatch, caplog):
    monkeypatch.setattr(distal.export, "LABEL_STUDIO_WARN_BYTES", 1000)
    caplog.set_level(logging.WARNING, logger="distal.export")
    # The CLI's logging setup stops distal's records from reaching the root logger, where caplog listens.
    monkeypatch.setattr(logging.getLogger("distal"), "propagate", True)

    export_selection(str(run_dir), 1, image_uri_base="s3://bucket/images/")
    assert not caplog.records
    export_selection(str(run_dir), 1)

    assert len(caplog.records) == 1
    assert "image_uri_base" in caplog.records[0].getMessage()


# --- labels back into the run directory -----------------------------------------------------------


def test_filled_csv_imports_cleanly(run_dir, pool, tmp_path):
    exported = export_selection(str(run_dir), 1, image_uri_base="s3://bucket/images/")["csv"]
    filled = fill_labels(exported, tmp_path / "batch-1.csv", lambda sample_id: str(mnist_label(sample_id)))

    result = import_labels(str(run_dir), filled, pool_uri=pool)

    assert (result.added, result.relabeled, result.unchanged) == (len(SELECTION), 0, 0)
    labels = {row["id"]: row["label"] for row in current_labels(str(run_dir)).to_pylist()}
    assert labels == {sample_id: mnist_label(sample_id) for _, sample_id, _ in SELECTION}


def test_filled_csv_imports_with_cli(run_dir, tmp_path, capsys):
    exported = export_selection(str(run_dir), 1)["csv"]
    filled = fill_labels(exported, tmp_path / "batch-1.csv", lambda sample_id: str(mnist_label(sample_id)))

    code = cli_main(["labels", "import", str(run_dir), filled])

    assert code == 0
    assert f"{len(SELECTION)} new labels" in capsys.readouterr().out
    assert current_labels(str(run_dir)).num_rows == len(SELECTION)


def test_partly_filled_csv_is_rejected(run_dir, pool, tmp_path):
    exported = export_selection(str(run_dir), 1)["csv"]
    filled = fill_labels(exported, tmp_path / "partial.csv", lambda sample_id: "" if sample_id == "mnist-00249" else "3")

    with pytest.raises(LabelImportError, match=r"row 3 \(line 4\), id 'mnist-00249': label is missing"):
        import_labels(str(run_dir), filled, pool_uri=pool)


def label_studio_task(task_id: int, data: dict, annotations: list[dict]) -> dict:
    """A task in Label Studio's JSON export format: the imported data plus annotations with results."""
    return {
        "id": task_id,
        "data": data,
        "annotations": annotations,
        "predictions": [],
        "project": 3,
        "created_at": "2025-03-01T09:00:00.000000Z",
        "updated_at": "2025-03-01T10:00:00.000000Z",
    }


def annotation(choice: str | list[str] | None, cancelled: bool = False, ground_truth: bool = False, from_name: str = "digit") -> dict:
    result = []
    if choice is not None:
        choices = choice if isinstance(choice, list) else [choice]
        result.append({"id": "r1", "from_name": from_name, "to_name": "image", "type": "choices", "origin": "manual", "value": {"choices": choices}})
    return {
        "id": 1001,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": ground_truth,
        "completed_by": 1,
        "lead_time": 3.2,
        "created_at": "2025-03-01T09:30:00.000000Z",
    }


def write_label_studio_export(path: Path, tasks: list[dict]) -> str:
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return str(path)


def test_label_studio_export_round_trip(run_dir, pool, tmp_path):
    exported = json.loads(Path(export_selection(str(run_dir), 1)["label_studio"]).read_text(encoding="utf-8"))
    decisions = {
        "mnist-00150": [annotation(str(mnist_label("mnist-00150")))],
        "mnist-00007": [annotation("1", cancelled=True), annotation(str(mnist_label("mnist-00007")))],
        "mnist-00249": [annotation("4"), annotation(str(mnist_label("mnist-00249")), ground_truth=True)],
        "mnist-00100": [],
        "mnist-00099": [annotation(None, cancelled=True)],
    }
    tasks = [label_studio_task(40 + n, task["data"], decisions[task["data"]["distal_id"]]) for n, task in enumerate(exported)]
    export_file = write_label_studio_export(tmp_path / "project-3-at-2025-03-01.json", tasks)

    result = labels_from_label_studio(export_file, str(tmp_path / "labels.csv"), CLASSES)
    imported = import_labels(str(run_dir), result.out_csv, pool_uri=pool)

    assert (result.tasks, result.labeled, result.unlabeled) == (5, 3, 2)
    assert result.out_csv == str(tmp_path / "labels.csv")
    assert read_csv(result.out_csv) == [
        {"id": sample_id, "label": str(mnist_label(sample_id))} for sample_id in ("mnist-00150", "mnist-00007", "mnist-00249")
    ]
    assert imported.added == 3


def test_label_studio_class_names_become_indexes(tmp_path):
    tasks = [label_studio_task(1, {"distal_id": "cat/1"}, [annotation("dog", from_name="animal")])]
    export_file = write_label_studio_export(tmp_path / "export.json", tasks)

    indexed = labels_from_label_studio(export_file, str(tmp_path / "indexed.csv"), ["cat", "dog"])
    named = labels_from_label_studio(export_file, str(tmp_path / "named.csv"), None)

    assert read_csv(indexed.out_csv) == [{"id": "cat/1", "label": "1"}]
    assert read_csv(named.out_csv) == [{"id": "cat/1", "label": "dog"}]


def test_label_studio_from_name_picks_tag(tmp_path):
    both = annotation("cat", from_name="animal")
    both["result"].append({"from_name": "quality", "to_name": "image", "type": "choices", "value": {"choices": ["blurry"]}})
    export_file = write_label_studio_export(tmp_path / "export.json", [label_studio_task(1, {"distal_id": "x"}, [both])])

    with pytest.raises(LabelStudioExportError, match=r"several tags \['animal', 'quality'\]; pass from_name"):
        labels_from_label_studio(export_file, str(tmp_path / "out.csv"), ["cat", "dog"])
    result = labels_from_label_studio(export_file, str(tmp_path / "out.csv"), ["cat", "dog"], from_name="animal")

    assert read_csv(result.out_csv) == [{"id": "x", "label": "0"}]


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (label_studio_task(7, {"image": "x.png"}, [annotation("3")]), r"task 1 \(Label Studio id 7\): no distal_id in data"),
        ({"annotations": []}, "task 1: expected an object with a 'data' object"),
        (label_studio_task(7, {"distal_id": "a"}, [annotation("3"), annotation("5")]), r"annotations disagree \(\['3', '5'\]\)"),
        (
            label_studio_task(7, {"distal_id": "a"}, [annotation("3", ground_truth=True), annotation("5", ground_truth=True)]),
            "ground-truth annotations disagree",
        ),
        (label_studio_task(7, {"distal_id": "a"}, [annotation(["3", "5"])]), "expected one chosen class, but the annotation has 2"),
        (label_studio_task(7, {"distal_id": "a"}, [annotation([])]), "expected one chosen class, but the annotation has 0"),
        (label_studio_task(7, {"distal_id": "a"}, [annotation("three")]), "choice 'three' is not a class"),
        (label_studio_task(7, {"distal_id": "a"}, "oops"), "'annotations' is not a list"),
    ],
    ids=["no-distal-id", "no-data", "disagree", "ground-truth-disagree", "two-choices", "no-choice", "unknown-class", "bad-annotations"],
)
def test_label_studio_bad_task_rejected(tmp_path, task, message):
    export_file = write_label_studio_export(tmp_path / "export.json", [task])
    out = tmp_path / "out.csv"

    with pytest.raises(LabelStudioExportError, match=message) as info:
        labels_from_label_studio(export_file, str(out), CLASSES)

    assert len(info.value.problems) == 1
    assert not out.exists()


def test_label_studio_repeated_id_rejected(tmp_path):
    tasks = [label_studio_task(n, {"distal_id": "a"}, [annotation("3")]) for n in (1, 2)]
    export_file = write_label_studio_export(tmp_path / "export.json", tasks)

    with pytest.raises(LabelStudioExportError, match="task 2 \\(Label Studio id 2\\), id 'a': the id appears in more than one task"):
        labels_from_label_studio(export_file, str(tmp_path / "out.csv"), CLASSES)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"data": {"distal_id": "a"}}', "expected a JSON list of tasks, but got dict"),
        ("[{", "is not JSON"),
        (b"\xff\xfe[]", "is not JSON"),
    ],
    ids=["one-task", "truncated", "not-utf8"],
)
def test_label_studio_unreadable_export_rejected(tmp_path, content, message):
    path = tmp_path / "export.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())

    with pytest.raises(LabelStudioExportError, match=message):
        labels_from_label_studio(str(path), str(tmp_path / "out.csv"), CLASSES)


def test_label_studio_missing_export_rejected(tmp_path):
    with pytest.raises(LabelStudioExportError, match="not found"):
        labels_from_label_studio(str(tmp_path / "nothing.json"), str(tmp_path / "out.csv"), CLASSES)


# --- errors -----------------------------------------------------------------------------------------


def test_incomplete_cycle_rejected(tmp_path, pool):
    run = tmp_path / "run"
    make_cycle(run, 1, SELECTION, pool, complete=False)

    with pytest.raises(ExportError, match="Cycle 1 of .* is not complete \\(no _COMPLETE marker\\)"):
        export_selection(str(run), 1)
    assert not (run / "cycles" / "0001" / "export").exists()


def test_unknown_cycle_lists_completed(run_dir):
    with pytest.raises(ExportError, match=r"Cycle 4 not found in .*; completed cycles: \[1\]"):
        export_selection(str(run_dir), 4)


def test_missing_run_directory_rejected(tmp_path):
    with pytest.raises(ExportError, match="Run directory .* not found"):
        export_selection(str(tmp_path / "nothing"), 1)


@pytest.mark.parametrize("cycle", [0, -1, "1", 1.0, True, None])
def test_invalid_cycle_number_rejected(run_dir, cycle):
    with pytest.raises(ValueError, match="Expected a cycle number from 1"):
        export_selection(str(run_dir), cycle)


@pytest.mark.parametrize("base", ["", "  "])
def test_empty_image_uri_base_rejected(run_dir, base):
    with pytest.raises(ValueError, match="Expected image_uri_base as a URI prefix"):
        export_selection(str(run_dir), 1, image_uri_base=base)


def test_out_dir_that_is_a_file_rejected(run_dir, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")

    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_selection(str(run_dir), 1, out_dir=str(file))
    with pytest.raises(ExportError, match="Cannot create the output folder"):
        export_selection(str(run_dir), 1, out_dir=str(file / "inside"))
    with pytest.raises(ValueError, match="Expected out_dir as a folder"):
        export_selection(str(run_dir), 1, out_dir="")
    assert file.read_text() == "x"


def test_ids_missing_from_pool_named(tmp_path, pool):
    run = tmp_path / "run"
    make_cycle(run, 1, [*SELECTION, (6, "mnist-09999", 0.01), (7, "gone", 0.005)], pool)

    with pytest.raises(ExportError) as info:
        export_selection(str(run), 1)

    message = str(info.value)
    assert "2 of the 7 ids selected in cycle 1 are in no shard of pool" in message
    assert "'mnist-09999', 'gone'" in message
    assert "pool_uri" in message
    assert not (run / "cycles" / "0001" / "export").exists()


def test_moved_pool_needs_pool_uri(tmp_path, pool):
    run = tmp_path / "run"
    make_cycle(run, 1, SELECTION, str(tmp_path / "moved-away"))

    with pytest.raises(ExportError, match=r"cannot be read: .*pass --pool \(pool_uri in Python\) when the pool has moved"):
        export_selection(str(run), 1)
    written = export_selection(str(run), 1, pool_uri=pool)

    assert len(read_csv(written["csv"])) == len(SELECTION)


def test_manifest_without_pool_rejected(tmp_path, pool):
    run = tmp_path / "run"
    folder = make_cycle(run, 1, SELECTION, pool)
    (folder / "manifest.json").write_text(json.dumps({"cycle": 1}))

    with pytest.raises(ExportError, match="manifest.json has no readable pool path"):
        export_selection(str(run), 1)


def test_selection_without_rank_rejected(tmp_path, pool):
    run = tmp_path / "run"
    folder = make_cycle(run, 1, SELECTION, pool)
    pq.write_table(pa.table({"id": ["mnist-00001"], "predicted_loss": [1.0]}), folder / "selected.parquet")

    with pytest.raises(ExportError, match=r"expected the columns rank \(int64\), id \(string\) and predicted_loss"):
        export_selection(str(run), 1)


def test_empty_or_unknown_image_rejected(tmp_path):
    pool = str(tmp_path / "pool")
    tiff = encode(np.zeros((8, 8), np.uint8), "TIFF")
    png = encode(np.zeros((8, 8), np.uint8), "PNG")
    write_small_pool(pool, ["ok", "empty", "tiff"], [png, b"", tiff])
    run = tmp_path / "run"
    make_cycle(run, 1, [(1, "ok", 3.0), (2, "empty", 2.0), (3, "tiff", 1.0)], pool)

    with pytest.raises(ExportError, match=r"2 selected images are empty or not PNG, JPEG, GIF, WebP or BMP: 'empty' \(empty\), 'tiff' \(unknown format\)"):
        export_selection(str(run), 1)


# --- object storage ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_s3_run_directory(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(use_listings_cache=False)
    pool = f"s3://{s3_bucket}/pools/mnist"
    run = f"s3://{s3_bucket}/runs/demo"
    write_mnist_pool(pool, POOL_SIZE, rows_per_shard=ROWS_PER_SHARD)
    local = tmp_path / "staging"
    make_cycle(local, 1, SELECTION, pool)
    fs.put(str(local / "cycles"), f"{s3_bucket}/runs/demo/", recursive=True)

    written = export_selection(run, 1, image_uri_base="https://cdn.example.com/mnist/")
    outside = export_selection(run, 1, out_dir=f"s3://{s3_bucket}/handoff/cycle-1")

    assert written["csv"] == f"{run}/cycles/0001/export/selected.csv"
    assert outside["label_studio"] == f"s3://{s3_bucket}/handoff/cycle-1/label-studio.json"
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(written["csv"]).decode("utf-8"))))
    assert [row["id"] for row in rows] == [sample_id for _, sample_id, _ in SELECTION]
    assert [row["shard"] for row in rows] == [f"{pool}/part-{LOCATIONS[row['id']][0]:05d}.parquet" for row in rows]
    assert [int(row["row"]) for row in rows] == [LOCATIONS[row["id"]][1] for row in rows]
    tasks = json.loads(fs.cat_file(outside["label_studio"]))
    assert [task["data"]["distal_id"] for task in tasks] == [sample_id for _, sample_id, _ in SELECTION]
    assert all(task["data"]["image"].startswith("data:image/png;base64,") for task in tasks)

    with pytest.raises(ExportError, match="Cycle 2 not found"):
        export_selection(run, 2)


def test_baseline_selection_exports_empty_predicted_loss(tmp_path, pool):
    # A baseline strategy trains no loss module, so its selection has null predicted losses.
    run = tmp_path / "baseline-run"
    make_cycle(run, 1, [(1, "mnist-00007", None), (2, "mnist-00150", None)], pool)
    written = export_selection(str(run), 1)

    rows = read_csv(written["csv"])
    assert [row["id"] for row in rows] == ["mnist-00007", "mnist-00150"]
    assert [row["predicted_loss"] for row in rows] == ["", ""]
    assert [record["predicted_loss"] for record in read_jsonl(written["jsonl"])] == [None, None]
