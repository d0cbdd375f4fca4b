#!/usr/bin/env bash
# A grid at cluster scale on the local Slurm test cluster (slurm/cluster.sh up): grids of 200 and
# 1,000 runs submitted as job arrays (issue #28) and held pending, then status, resubmit and cancel.
# For each: how many sbatch calls, and the wall time of submit, status (the backend's one squeue
# call, and `qlaunch status` end to end) and resubmit (nothing missing: 0 sbatch calls).
#
#   bash bench/scale_slurm.sh [RUNS ...]        # default: 200 1000
#   QLAUNCH_SRC=/path/to/other/checkout bash bench/scale_slurm.sh 1000   # the same, another qlaunch
#
# The jobs are held (`--hold` through slurm.extra_directives) rather than queued behind a blocker
# job that takes the node: the test cluster is shared, and a held job is as pending to sbatch,
# squeue and scancel as a job waiting for a node. Everything is cancelled at the end.
# Needs the repo's venv (PYTHON, default .venv/bin/python) and a running test cluster.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$here/.venv/bin/python}
src=${QLAUNCH_SRC:-$here}
[ $# -gt 0 ] || set -- 200 1000
work=$(mktemp -d /tmp/qlaunch-scale-slurm.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Log each sbatch / squeue / scancel call, then run the real command.
mkdir "$work/bin"
for name in sbatch squeue scancel scontrol sacctmgr; do
    real=$(command -v "$name") || { echo "scale_slurm.sh: $name not found: start the test cluster (bash slurm/cluster.sh up)" >&2; exit 1; }
    printf '#!/bin/sh\necho "%s $*" >> "%s"\nexec %s "$@"\n' "$name" "$work/calls.log" "$real" >"$work/bin/$name"
    chmod +x "$work/bin/$name"
done
export PATH="$work/bin:$PATH"
echo "MaxArraySize: $(scontrol show config | awk '$1 == "MaxArraySize" { print $3 }')"

for runs in "$@"; do
    (cd "$work" && PYTHONPATH=$src "$PYTHON" - "$runs" "$work") <<'EOF'
import subprocess
import sys
import time
from pathlib import Path

import yaml

try:  # the backend's module since the house (#27); a checkout before it (QLAUNCH_SRC) has it one level up
    from launcher.backends.slurm.backend import SlurmBackend
except ImportError:
    from launcher.backends.slurm import SlurmBackend
from launcher.grid import plan

runs, work = int(sys.argv[1]), Path(sys.argv[2])
log = work / "calls.log"
name = f"scale{runs}-{int(time.time())}"
data = {"name": name, "backend": "slurm", "storage": {"root": str(work / "runs")},
        "environment": {"python": sys.executable},
        "resources": {"gpus_per_node": 0, "cpus_per_task": 1, "memory": "1G", "time_limit": "00:20:00"},
        "slurm": {"extra_directives": ["--hold"]}, "grid": {"train.seed": list(range(runs))}}
source = work / f"{name}.yaml"
source.write_text(yaml.safe_dump(data, sort_keys=False))


def calls(kind: str) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if line.split(" ", 1)[0] == kind and "--test-only" not in line]


def timed(what, action):
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    print(f"{runs:>5} runs  {what:<28} {seconds:6.2f} s   sbatch {len(calls('sbatch')):>3}   "
          f"squeue {len(calls('squeue')):>2}   scancel {len(calls('scancel')):>2}")
    return result


p = plan(source)
backend = SlurmBackend()
report = timed("submit", lambda: backend.submit(p))
assert len(report.submitted) == runs, report.notes
statuses = timed("status (backend)", lambda: backend.status(p))
assert len(statuses) == runs
cli = [sys.executable, "-m", "launcher.cli", "status", str(source), "--backend", "slurm"]  # PYTHONPATH: $src
timed("status (qlaunch status)", lambda: subprocess.run(cli, capture_output=True, check=True))
again = timed("resubmit (nothing missing)", lambda: backend.submit(p))
assert again.submitted == {}
timed("cancel (the experiment)", lambda: backend.cancel(p, list(p.runs)))
EOF
done
