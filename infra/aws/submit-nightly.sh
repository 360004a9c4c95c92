#!/usr/bin/env bash
# Submit tonight's distal job to the `ray up` cluster of cluster.yaml and wait
# for it. The script exits with the job's status (docs/deploy.md). A crontab
# line on the machine that ran `ray up`, with distal's virtual environment
# first on PATH:
#
#   0 2 * * * cd /srv/distal && PATH=/srv/distal/.venv/bin:$PATH DISTAL_START_DATE=2027-01-04 infra/aws/submit-nightly.sh >>/var/log/distal-nightly.log 2>&1
#
# Environment:
#   DISTAL_START_DATE   the schedule's first night, YYYY-MM-DD (UTC); required
#   DISTAL_CONFIG       configuration file relative to the repository root;
#                       default configs/nightly-example.yaml
#   RAY_AUTH_TOKEN_PATH the cluster's token file; default ~/.ray/distal-aws-token
#   DASHBOARD_PORT      local port of the dashboard tunnel; default 8265
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DISTAL_START_DATE:?set DISTAL_START_DATE to the first night of the schedule, as YYYY-MM-DD}"
export DISTAL_START_DATE
export DISTAL_CONFIG="${DISTAL_CONFIG:-configs/nightly-example.yaml}"
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/distal-aws-token}"
port="${DASHBOARD_PORT:-8265}"
export RAY_ADDRESS="http://127.0.0.1:${port}"

# `ray dashboard` keeps an SSH tunnel to the head node's dashboard, which
# serves the job API, until it is stopped.
ray dashboard --port "$port" infra/aws/cluster.yaml >/dev/null 2>&1 &
tunnel=$!
trap 'kill "$tunnel" 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    if python -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)" "$port" 2>/dev/null; then
        break
    fi
    sleep 2
done

# The command below is the one in docs/deploy.md, and tests/test_deploy.py checks that they match.
RAY_AUTH_MODE=token ray job submit --address "$RAY_ADDRESS" --working-dir . \
    --submission-id "$(python -m distal.submission id --config "$DISTAL_CONFIG")" -- \
    python jobs/cycle.py --config "$DISTAL_CONFIG" \
    --cycles "$(python -m distal.submission cycles --start-date "$DISTAL_START_DATE")"
