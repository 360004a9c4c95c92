"""Experiments: configuration, the smoke configuration end to end, results table, summary and plots."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distal import experiment
from distal.cli import _run_reporting_errors, build_parser
from distal.config import ConfigError
from distal.labels import INITIAL_FILE

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "mnist-smoke.yaml")


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name", ["mnist-smoke.yaml", "mnist-cpu.yaml", "cifar10-cpu.yaml", "cifar10-paper.yaml"])
def test_shipped_experiment_configs_load(name):
    config = experiment.load(str(REPO / "configs" / name))
    assert config.run.oracle
    assert "learning_loss" in config.strategies
    for strategy in config.strategies:
        run = experiment.run_config(config, strategy, 1)
        assert run.select.strategy == strategy
        assert run.seed == config.seed + 1
        assert run.run_dir.endswith(f"runs/{strategy}/trial-1")


def test_paper_protocol_config_matches_the_paper():
    run = experiment.load(str(REPO / "configs" / "cifar10-paper.yaml")).run
    assert (run.model.width, run.model.loss_module_dim) == (64, 128)
    assert (run.initial_labels, run.select.k, run.cycles, run.score.subset_size) == (1000, 1000, 10, 10_000)
    train = run.train
    assert (train.epochs, train.lr, train.milestones, train.gradient_stop_epoch) == (200, 0.1, (160,), 120)
    assert (train.margin, train.loss_weight, train.batch_size, train.momentum, train.weight_decay) == (1.0, 1.0, 128, 0.9, 5e-4)
    assert not train.warm_start


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run:\n  run_dir: x\n", "run.run_dir is set per run"),
        ("run:\n  seed: 3\n", "run.seed is set per run"),
        ("run:\n  oracle: false\n", "always simulate labeling"),
        ("run:\n  select:\n    strategy: random\n", "run.select.strategy is set per run"),
        ("strategies: [learning_loss, bald]\n", "strategies="),
        ("strategies: [random, random]\n", "distinct"),
        ("trials: 0\n", "trials=0"),
        ("run:\n  cycles: null\n", "fixed number of cycles"),
        ("run:\n  train:\n    epoks: 3\n", "unknown configuration key"),
        ("run:\n  score:\n    subset_size: null\nstrategies: [coreset]\n", "select.strategy=coreset"),
    ],
)
def test_bad_experiment_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        experiment.load(write_yaml(tmp_path / "bad.yaml", text))


def test_cli_reports_a_bad_experiment_config(tmp_path, capsys):
    # The parser and handler of `distal experiment`, without main()'s logging setup.
    code = _run_reporting_errors(build_parser().parse_args(["experiment", write_yaml(tmp_path / "bad.yaml", "trials: -1\n")]))
    assert code == 2
    assert "trials=-1" in capsys.readouterr().err


def hand_made_results() -> pa.Table:
    rows = []
    for strategy, base in (("learning_loss", 0.80), ("random", 0.70)):
        for trial in range(3):
            for cycle in (1, 2):
                rows.append(
                    {
                        "strategy": strategy, "trial": trial, "seed": trial, "cycle": cycle, "labeled": 100 * cycle,
                        "eval_accuracy": base + 0.05 * cycle + 0.01 * trial,
                        "ranking_accuracy": 0.6 + 0.1 * cycle if strategy == "learning_loss" else None,
                        "target_loss": 1.0, "train_s": 10.0, "score_s": 2.0, "select_s": 0.5, "cycle_s": 13.0,
                    }
                )
    return pa.table({name: pa.array([row[name] for row in rows], kind) for name, kind in experiment.RESULT_COLUMNS})


def test_aggregate_and_summary_give_mean_min_max():
    table = hand_made_results()
    accuracy = experiment.aggregate(table, "eval_accuracy")
    assert accuracy["learning_loss"][0] == pytest.approx((1, 100, 0.86, 0.85, 0.87, 3))
    assert accuracy["random"][1] == pytest.approx((2, 200, 0.81, 0.80, 0.82, 3))
    assert list(experiment.aggregate(table, "ranking_accuracy")) == ["learning_loss"]
    summary = experiment.format_summary(table, experiment.ExperimentConfig(name="hand", out_dir="x"))
    assert "| learning_loss | 3 | 86.00 (85.00-87.00) | 91.00 (90.00-92.00) |" in summary
    assert "| random | 3 | 76.00 (75.00-77.00) | 81.00 (80.00-82.00) |" in summary


def test_plots_are_png():
    table = hand_made_results()
    assert experiment.plot_accuracy(table, "hand").startswith(b"\x89PNG\r\n\x1a\n")
    assert experiment.plot_ranking_accuracy(table, "hand").startswith(b"\x89PNG\r\n\x1a\n")
    assert experiment.plot_ranking_accuracy(table.filter(pa.compute.equal(table.column("strategy"), "random")), "hand") is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_experiment_runs_every_strategy_and_reruns_nothing(ray_cluster, mnist_pools, tmp_path, caplog):
    pool, eval_pool = mnist_pools
    out_dir = tmp_path / "smoke"
    overrides = [f"out_dir={out_dir}", f"run.pool.path={pool.path}", f"run.pool.eval_path={eval_pool.path}"]
    config = experiment.load(SMOKE, overrides)

    table = experiment.run_experiment(config)

    assert table.num_rows == len(config.strategies) * config.trials * config.run.cycles
    assert set(table.column("strategy").to_pylist()) == set(config.strategies)
    assert table.column("eval_accuracy").null_count == 0
    for row in table.to_pylist():
        assert (row["ranking_accuracy"] is not None) == (row["strategy"] == "learning_loss")
    assert [row["labeled"] for row in table.to_pylist()][:2] == [40, 60]
    for name in ("results.parquet", "results.csv", "summary.md", "accuracy.png", "ranking_accuracy.png", "experiment.yaml"):
        assert (out_dir / name).stat().st_size > 0, name
    assert pq.read_table(out_dir / "results.parquet").equals(table)

    # All strategies of a trial start from the same labeled set.
    initial = {strategy: pq.read_table(out_dir / "runs" / strategy / "trial-0" / "labels" / INITIAL_FILE) for strategy in config.strategies}
    first = initial[config.strategies[0]].column("id").to_pylist()
    assert all(labels.column("id").to_pylist() == first for labels in initial.values())

    # Baselines record that they trained without the loss module.
    for strategy in config.strategies:
        manifest = (out_dir / "runs" / strategy / "trial-0" / "cycles" / "0002" / "manifest.json").read_text()
        assert f'"loss_module": {str(strategy == "learning_loss").lower()}' in manifest
        assert f'"strategy": "{strategy}"' in manifest

    before = {path: path.stat().st_mtime_ns for path in out_dir.glob("runs/*/trial-0/cycles/*/manifest.json")}
    caplog.set_level(logging.INFO, logger="distal.experiment")
    again = experiment.run_experiment(config)
    assert again.equals(table)
    assert sum("action=skip reason=complete" in record.getMessage() for record in caplog.records) == len(config.strategies)
    assert {path: path.stat().st_mtime_ns for path in before} == before
