"""Run an active-learning experiment: strategies x trials x cycles, then a results table and plots.

Local (starts an in-process Ray, local files; import the pools first as the
README shows):

    python jobs/experiment.py configs/mnist-cpu.yaml

On a Ray cluster (options of ray job submit go before the --; pools and the
experiment folder as absolute paths or s3:// URIs):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/experiment.py configs/cifar10-paper.yaml --out-dir s3://bucket/experiments/cifar10-paper \
        --set run.pool.path=s3://bucket/pools/cifar10/train --set run.pool.eval_path=s3://bucket/pools/cifar10/test

Rerunning the same command skips finished (strategy, trial) runs and resumes
an interrupted one. A smoke test of the whole path on a tiny pool:

    python jobs/experiment.py configs/mnist-smoke.yaml
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distal.cli import _run_reporting_errors, add_experiment_arguments, run_experiment_command  # noqa: E402
from distal.progress import configure_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_experiment_arguments(parser)
    parser.set_defaults(handler=run_experiment_command)
    configure_logging()
    return _run_reporting_errors(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
