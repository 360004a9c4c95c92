"""The ``distal`` command: ``distal cycle``, ``distal experiment``, ``distal pool import`` and the label tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from distal.progress import configure_logging

log = logging.getLogger("distal.cli")


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """Add the repeatable ``--set KEY=VALUE`` override option, with ``example`` in its help."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one configuration key (dotted, YAML value), for example {example}; repeatable",
    )


def add_cycle_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of a cycle run (shared by ``distal cycle`` and ``jobs/cycle.py``)."""
    parser.add_argument("--config", help="YAML configuration file; keys not given keep their defaults")
    add_set_argument(parser, "--set train.epochs=5")
    parser.add_argument("--run-dir", help="run directory URI (sets run_dir)")
    parser.add_argument("--cycles", type=int, help="cycles the run directory should hold when the job ends (sets cycles)")
    parser.add_argument("--oracle", action="store_true", default=None, help="simulation: label selections from the pool's label column (sets oracle=true)")
    parser.add_argument("--address", help="Ray cluster address (sets ray_address); default: RAY_ADDRESS, else a local Ray")


def cycle_overrides(args: argparse.Namespace) -> list[str]:
    """Translate the shortcut flags into ``--set`` overrides; explicit ``--set`` wins."""
    overrides = []
    if args.run_dir is not None:
        overrides.append(f"run_dir={json.dumps(args.run_dir)}")
    if args.cycles is not None:
        overrides.append(f"cycles={args.cycles}")
    if args.oracle:
        overrides.append("oracle=true")
    if args.address is not None:
        overrides.append(f"ray_address={json.dumps(args.address)}")
    return overrides + list(args.overrides)


def run_cycle_command(args: argparse.Namespace) -> int:
    from distal import config as config_module
    from distal.cycle import run

    try:
        config = config_module.load(args.config, cycle_overrides(args))
    except config_module.ConfigError as err:
        print(f"distal: error: {err}", file=sys.stderr)
        return 2
    _warn_relative_paths(config)
    run(config)
    return 0


def _warn_relative_paths(config) -> None:
    """Warn when a job on a Ray cluster names local paths relative to its working directory."""
    import os

    if not (config.ray_address or os.environ.get("RAY_ADDRESS")):
        return
    for key, value in (("run_dir", config.run_dir), ("pool.path", config.pool.path), ("pool.eval_path", config.pool.eval_path)):
        if value and "://" not in value and not os.path.isabs(value):
            log.warning(
                "%s=%s is a relative path; under ray job submit it resolves inside the job's unpacked "
                "working directory (%s). Use an absolute path or an s3:// URI.",
                key, value, os.getcwd(),
            )


def run_pool_import(args: argparse.Namespace) -> int:
    from distal import pool_import
    from distal.pool import POOL_METADATA, open_fs

    if args.if_missing:
        targets = [args.out] + ([args.eval_out] if args.eval_out else [])
        complete = []
        for target in targets:
            fs, path = open_fs(target)
            complete.append(fs.exists(f"{path}/{POOL_METADATA}"))
        if all(complete):
            log.info("stage=import action=skip reason=pools_exist out=%s eval_out=%s", args.out, args.eval_out)
            return 0

    common = {
        "eval_out": args.eval_out,
        "eval_size": args.eval_size,
        "seed": args.seed,
        "rows_per_shard": args.rows_per_shard,
        "overwrite": args.overwrite,
    }
    if args.source == "idx":
        summary = pool_import.import_idx(args.images, args.labels, args.out, **common)
    elif args.source == "folder":
        summary = pool_import.import_folder(args.root, args.out, **common)
    else:
        summary = pool_import.import_torchvision(args.name, args.root, args.out, train=not args.test_split, download=args.download, **common)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def run_pool_synth(args: argparse.Namespace) -> int:
    from distal.synth import synthesize_pool

    start = time.monotonic()
    info = synthesize_pool(
        args.out,
        args.rows,
        image_size=args.image_size,
        channels=args.channels,
        image_format=args.format,
        classes=args.classes,
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    summary = {"pool": info.path, "rows": info.num_rows, "shards": len(info.shards), "seconds": round(time.monotonic() - start, 1)}
    print(json.dumps(summary, indent=2))
    return 0


def run_labels_import(args: argparse.Namespace) -> int:
    import yaml

    from distal import config as config_module
    from distal.labels import import_labels
    from distal.rundir import RunDirectory

    pool = args.pool
    if pool is None:
        run = RunDirectory(args.run_dir)
        saved = run.path("config.yaml")
        if not run.fs.exists(saved):
            print(
                f"distal: error: {args.run_dir} has no config.yaml to read the pool from; pass --pool URI.",
                file=sys.stderr,
            )
            return 2
        with run.fs.open(saved, "r") as handle:
            pool = config_module.from_dict(yaml.safe_load(handle), source=saved).pool.path
    result = import_labels(args.run_dir, args.file, pool_uri=pool, relabel=args.relabel)
    if result.already_imported:
        print(f"{args.file} was imported before (sha256 {result.sha256[:12]}); nothing changed.")
    else:
        print(
            f"Imported {args.file}: {result.added} new labels, {result.relabeled} relabeled, "
            f"{result.unchanged} unchanged, into {result.label_file or 'no new file'}."
        )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from distal.export import export_selection

    written = export_selection(
        args.run_dir,
        args.cycle,
        out_dir=args.out_dir,
        image_uri_base=args.image_uri_base,
        embed_images=args.embed_images,
        pool_uri=args.pool,
    )
    for kind, uri in written.items():
        print(f"{kind}: {uri}")
    return 0


def run_from_label_studio(args: argparse.Namespace) -> int:
    from distal.export import labels_from_label_studio
    from distal.pool import read_pool_info

    classes = read_pool_info(args.pool).classes if args.pool else None
    result = labels_from_label_studio(args.export_json, args.out_csv, classes, from_name=args.from_name)
    print(f"Wrote {args.out_csv}: {result.labeled} labeled of {result.tasks} tasks ({result.unlabeled} without a label).")
    return 0


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of an experiment (shared by ``distal experiment`` and ``jobs/experiment.py``)."""
    parser.add_argument("config", help="experiment YAML file, for example configs/mnist-cpu.yaml")
    add_set_argument(parser, "--set trials=1 --set run.train.epochs=5")
    parser.add_argument("--out-dir", help="experiment folder URI (sets out_dir)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the results table, summary and plots from the runs found; run nothing")


def run_experiment_command(args: argparse.Namespace) -> int:
    from distal import experiment
    from distal.config import ConfigError

    overrides = ([f"out_dir={json.dumps(args.out_dir)}"] if args.out_dir else []) + list(args.overrides)
    try:
        config = experiment.load(args.config, overrides)
    except ConfigError as err:
        print(f"distal: error: {err}", file=sys.stderr)
        return 2
    experiment.run_experiment(config, report_only=args.report_only)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from distal.rundir import RunDirectory
    from distal.status import format_status

    print(format_status(RunDirectory(args.run_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distal", description="Distributed active learning with a loss prediction module.")
    commands = parser.add_subparsers(dest="command", required=True)

    cycle = commands.add_parser(
        "cycle",
        help="run active-learning cycles: train, score, select",
        description="Run the cycles of a run directory: train, score, select, write the manifest.",
    )
    add_cycle_arguments(cycle)
    cycle.set_defaults(handler=run_cycle_command)

    experiment = commands.add_parser(
        "experiment",
        help="compare strategies over trials and cycles; write a results table and plots",
        description="Run strategies x trials x cycles of simulated active learning from one YAML file, "
        "then write results.parquet, results.csv, summary.md and plots into the experiment folder.",
    )
    add_experiment_arguments(experiment)
    experiment.set_defaults(handler=run_experiment_command)

    labels = commands.add_parser("labels", help="label tools")
    label_commands = labels.add_subparsers(dest="labels_command", required=True)
    label_import = label_commands.add_parser(
        "import", help="add labels from people to a run directory (CSV, JSON Lines or Parquet with id and label)"
    )
    label_import.add_argument("run_dir", help="run directory URI")
    label_import.add_argument("file", help="label file: .csv, .jsonl or .parquet with columns id and label")
    label_import.add_argument("--pool", help="pool URI whose ids and classes the labels must match; default: the run's config.yaml")
    label_import.add_argument("--relabel", action="store_true", help="allow labels that replace an id's existing label")
    label_import.set_defaults(handler=run_labels_import)

    from_studio = label_commands.add_parser(
        "from-label-studio", help="turn a Label Studio JSON export into a CSV that distal labels import reads"
    )
    from_studio.add_argument("export_json", help="Label Studio export (JSON)")
    from_studio.add_argument("out_csv", help="CSV to write, with columns id and label")
    from_studio.add_argument("--pool", help="pool URI whose class names map to class indexes; without it labels stay class names")
    from_studio.add_argument("--from-name", help="name of the Choices control to read when the project has several")
    from_studio.set_defaults(handler=run_from_label_studio)

    export = commands.add_parser(
        "export",
        help="write a completed cycle's selection as CSV, JSON Lines and Label Studio tasks for labeling",
        description="Write a completed cycle's selection as CSV, JSON Lines and Label Studio tasks for labeling.",
    )
    export.add_argument("run_dir", help="run directory URI")
    export.add_argument("cycle", type=int, help="completed cycle number")
    export.add_argument("--out-dir", help="folder for the files; default: RUN_DIR/cycles/NNNN/export/")
    export.add_argument(
        "--image-uri-base",
        help="prefix of image URIs in your own image store (distal does not upload images); image_uri = PREFIX + id + extension",
    )
    export.add_argument("--embed-images", action="store_true", help="put the images into label-studio.json as data URIs even with --image-uri-base")
    export.add_argument("--pool", help="pool URI when it moved since the cycle; default: the pool in the cycle's manifest.json")
    export.set_defaults(handler=run_export)

    status = commands.add_parser(
        "status", help="show every cycle of a run directory", description="Show every cycle of a run directory: state, counts and accuracy."
    )
    status.add_argument("run_dir", help="run directory URI")
    status.set_defaults(handler=run_status)

    pool = commands.add_parser("pool", help="pool tools")
    pool_commands = pool.add_subparsers(dest="pool_command", required=True)
    importer = pool_commands.add_parser("import", help="import images into a sharded Parquet pool")
    sources = importer.add_subparsers(dest="source", required=True)

    idx = sources.add_parser("idx", help="MNIST-format IDX files (.gz or plain)")
    idx.add_argument("--images", required=True, help="IDX image file, for example t10k-images-idx3-ubyte.gz")
    idx.add_argument("--labels", required=True, help="IDX label file, for example t10k-labels-idx1-ubyte.gz")

    folder = sources.add_parser("folder", help="an image folder laid out as CLASS_NAME/FILE.EXT")
    folder.add_argument("root", help="folder whose subfolders are the classes")

    tv = sources.add_parser("torchvision", help="a torchvision dataset by name (MNIST, FashionMNIST, CIFAR10)")
    tv.add_argument("name", help="dataset name")
    tv.add_argument("--root", required=True, help="torchvision dataset root folder")
    tv.add_argument("--test-split", action="store_true", help="import the test split instead of the training split")
    tv.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs internet)")

    for sub in (idx, folder, tv):
        sub.add_argument("--out", required=True, help="pool URI to write (local path or s3://...)")
        sub.add_argument("--eval-out", help="URI of the held-out evaluation set split off the same images")
        sub.add_argument("--eval-size", type=int, default=0, help="images put into --eval-out by a seeded random split (default: 0)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the evaluation split (default: 0)")
        sub.add_argument("--rows-per-shard", type=int, default=1000, help="rows per shard file (default: 1000)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing complete pool")
        sub.add_argument(
            "--if-missing",
            action="store_true",
            help="do nothing when complete pools already exist at --out (and --eval-out), so the command can be rerun",
        )
        sub.set_defaults(handler=run_pool_import)

    synth = pool_commands.add_parser(
        "synth",
        help="write a synthetic pool of random encoded images, for scale benchmarks only",
        description="Write a pool of synthetic labeled images (random gradients plus noise) in parallel. "
        "For benchmarks of reading, decoding, scoring and selection at scale; the images mean nothing.",
    )
    synth.add_argument("--out", required=True, help="pool URI to write (local path or s3://...)")
    synth.add_argument("--rows", type=int, required=True, help="images to write, for example 1000000")
    synth.add_argument("--image-size", type=int, default=32, help="height and width in pixels (default: 32)")
    synth.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 (grayscale) or 3 (RGB) (default: 3)")
    synth.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding (default: png)")
    synth.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    synth.add_argument("--seed", type=int, default=0, help="seed of images and labels (default: 0)")
    synth.add_argument("--rows-per-shard", type=int, default=1000, help="rows per shard file (default: 1000)")
    synth.add_argument("--workers", type=int, help="encoding processes (default: every CPU)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing complete pool")
    synth.set_defaults(handler=run_pool_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return _run_reporting_errors(args)


def _run_reporting_errors(args: argparse.Namespace) -> int:
    """Run the chosen command; known user errors print one clear line instead of a traceback."""
    from distal.config import ConfigError
    from distal.cycle import CycleError
    from distal.export import ExportError, LabelStudioExportError
    from distal.images import ImageDecodeError
    from distal.labels import LabelError
    from distal.lease import LeaseHeldError
    from distal.pool import PoolError
    from distal.score import ScoringError

    try:
        return args.handler(args)
    except LeaseHeldError as err:
        print(f"distal: error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, CycleError, PoolError, ImageDecodeError, ScoringError, LabelError, ExportError, LabelStudioExportError) as err:
        print(f"distal: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
