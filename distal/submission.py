"""Nightly submission names: one submission id and one cycle target per run and night.

A scheduler that fires twice for the same night, or a person who resubmits
it, must not start a second cycle. Two values make a night's submission
idempotent:

- the submission id ``distal-<run>-<YYYYMMDD>``, built from the last part of
  the run directory URI and the night's date in UTC. ``ray job submit
  --submission-id`` rejects an id that the cluster already ran, and a
  Kubernetes RayJob named with it cannot be created twice in a namespace;
- the cycle target: 1 cycle on night 1 (``start``), n cycles on night n.
  ``cycles: N`` means the run directory contains cycles 1 to N when the job
  ends, so a rerun of the same night finds its cycle complete and does
  nothing, and a missed night is caught up by the next one.

Usage::

    python -m distal.submission id --config configs/nightly-example.yaml
    python -m distal.submission cycles --start-date 2027-01-04
    python -m distal.submission rayjob --template rayjob.yaml \\
        --config configs/nightly-example.yaml --start-date 2027-01-04 --out tonight.yaml
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import sys
from typing import Any

import yaml

# KubeRay names the RayCluster, its head service and pods after the RayJob,
# so the RayJob name (the submission id) must leave room for their suffixes.
# NOTE: 47 is the limit of KubeRay's RayJob validation as read for KubeRay
# 1.6, not checked against a running operator. Ray itself accepts longer ids.
MAX_SUBMISSION_ID_LENGTH = 47


class SubmissionError(ValueError):
    """A submission id or cycle target cannot be built from the given values."""


def today_utc() -> dt.date:
    """Return today's date in UTC, the calendar that names each night."""
    return dt.datetime.now(dt.timezone.utc).date()


def run_name(run_dir: str) -> str:
    """Return the run's name: the last part of the run directory URI, lowercased, as ``[a-z0-9-]``.

    Raises:
        SubmissionError: when the URI has no usable last part.
    """
    last = run_dir.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^a-z0-9]+", "-", last.lower()).strip("-")
    if not name:
        raise SubmissionError(
            f"Invalid run_dir={run_dir!r} for a submission id: its last part has no letters or digits. "
            "Name the run directory, for example s3://bucket/runs/nightly."
        )
    return name


def submission_id(run_dir: str, night: dt.date) -> str:
    """Return ``distal-<run>-<YYYYMMDD>``, the submission id of ``night``'s job on ``run_dir``.

    Raises:
        SubmissionError: when the id would exceed MAX_SUBMISSION_ID_LENGTH characters.
    """
    identifier = f"distal-{run_name(run_dir)}-{night:%Y%m%d}"
    if len(identifier) > MAX_SUBMISSION_ID_LENGTH:
        raise SubmissionError(
            f"Submission id {identifier!r} has {len(identifier)} characters, more than the "
            f"{MAX_SUBMISSION_ID_LENGTH} a RayJob name may have. Use a shorter last part for run_dir."
        )
    return identifier


def nightly_cycles(start: dt.date, night: dt.date) -> int:
    """Return the cycles the run directory should hold after ``night``: 1 on ``start``, one more each night.

    Raises:
        SubmissionError: when ``night`` is before ``start``.
    """
    nights = (night - start).days
    if nights < 0:
        raise SubmissionError(f"The night {night} is before the schedule's start date {start}.")
    return nights + 1


def render_rayjob(template: dict[str, Any], run_dir: str, night: dt.date, cycles: int) -> dict[str, Any]:
    """Return a copy of the RayJob ``template`` for ``night``: named by the submission id, with ``--cycles``.

    The RayJob's name and ``spec.jobId`` become the submission id, and
    ``--cycles N`` is appended to ``spec.entrypoint``.

    Raises:
        SubmissionError: when the template is not a RayJob with an entrypoint,
            or its entrypoint already sets the cycle target.
    """
    if template.get("kind") != "RayJob" or not isinstance(template.get("spec"), dict):
        raise SubmissionError(f"Expected a RayJob manifest with a spec, but got kind={template.get('kind')!r}.")
    entrypoint = template["spec"].get("entrypoint")
    if not entrypoint:
        raise SubmissionError("The RayJob template has no spec.entrypoint to run.")
    if re.search(r"(^|\s)--cycles(\s|=|$)", entrypoint) or "cycles=" in entrypoint:
        raise SubmissionError(f"The RayJob template's entrypoint already sets the cycle target: {entrypoint!r}.")

    identifier = submission_id(run_dir, night)
    rendered = copy.deepcopy(template)
    rendered.setdefault("metadata", {})["name"] = identifier
    rendered["metadata"].pop("generateName", None)
    rendered["spec"]["jobId"] = identifier
    rendered["spec"]["entrypoint"] = f"{entrypoint.rstrip()} --cycles {cycles}"
    return rendered


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}") from err


def _configured_run_dir(args: argparse.Namespace) -> str:
    from distal import config as config_module

    overrides = [f"run_dir={json.dumps(args.run_dir)}"] if args.run_dir else []
    return config_module.load(args.config, overrides).run_dir


def _print_id(args: argparse.Namespace) -> None:
    print(submission_id(_configured_run_dir(args), args.date))


def _print_cycles(args: argparse.Namespace) -> None:
    print(nightly_cycles(args.start_date, args.date))


def _write_rayjob(args: argparse.Namespace) -> None:
    try:
        with open(args.template, encoding="utf-8") as handle:
            template = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise SubmissionError(f"Cannot read the RayJob template {args.template}: {err}") from err
    if not isinstance(template, dict):
        raise SubmissionError(f"The RayJob template {args.template} must contain one YAML mapping.")
    cycles = nightly_cycles(args.start_date, args.date)
    rendered = render_rayjob(template, _configured_run_dir(args), args.date, cycles)
    text = yaml.safe_dump(rendered, sort_keys=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distal.submission",
        description="Print the submission id, cycle target or RayJob manifest of one night's distal job.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    date_help = "the night as YYYY-MM-DD; default: today in UTC"

    identifier = commands.add_parser("id", help="print the submission id of the run and night")
    cycles = commands.add_parser("cycles", help="print the cycles the run directory should hold after the night")
    rayjob = commands.add_parser("rayjob", help="write the night's RayJob manifest from a template")
    rayjob.add_argument("--template", required=True, help="RayJob YAML file whose name, jobId and entrypoint are filled in")
    rayjob.add_argument("--out", help="file to write the manifest to; default: standard output")

    for command in (identifier, rayjob):
        command.add_argument("--config", required=True, help="the job's YAML configuration; its run_dir names the run")
        command.add_argument("--run-dir", help="run directory URI, when the job overrides the configuration's run_dir")
    for command in (cycles, rayjob):
        command.add_argument("--start-date", required=True, type=_parse_date, help="the schedule's first night as YYYY-MM-DD (UTC)")
    for command, handler in ((identifier, _print_id), (cycles, _print_cycles), (rayjob, _write_rayjob)):
        command.add_argument("--date", type=_parse_date, default=today_utc(), help=date_help)
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distal.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (SubmissionError, ConfigError) as err:
        print(f"distal: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
