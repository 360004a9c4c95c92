"""Run distal active-learning cycles: train, score, select, write the manifest.

Local (starts an in-process Ray, local files):

    python jobs/cycle.py --config configs/mnist-demo.yaml

On a Ray cluster (options of ray job submit go before the --; pools and the
run directory as absolute paths or s3:// URIs, because the job runs in an
unpacked copy of the working directory):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/cycle.py --config configs/mnist-demo.yaml --run-dir s3://bucket/runs/demo \
        --set pool.path=s3://bucket/pools/mnist/pool --set pool.eval_path=s3://bucket/pools/mnist/eval

The run directory contains cycles 1..cycles. Rerunning the same command skips
completed cycles and resumes an incomplete one from its last finished step. The exit status is 0 on
success and non-zero on any failure.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distal.cli import _run_reporting_errors, add_cycle_arguments, run_cycle_command  # noqa: E402
from distal.progress import configure_logging  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cycle_arguments(parser)
    parser.set_defaults(handler=run_cycle_command)
    configure_logging()
    return _run_reporting_errors(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
