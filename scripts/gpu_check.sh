#!/usr/bin/env bash
# The one-call GPU check (docs/gpu.md): the CUDA tests, the throughput pairs, the SE tail, the
# data pipeline and a short `semodel train`, each under its own time cap, in at most 8 minutes;
# OUTDIR gets gpu_check.json, summary.md and gpu_check.log.
#
#   bash scripts/gpu_check.sh OUTDIR             # on a CUDA machine; MSLD copied to .bench/msld first
#   bash scripts/gpu_check.sh --dry-run OUTDIR   # anywhere: the same parts on the CPU at toy sizes
#   bash scripts/gpu_check.sh --help             # options (--data DIR, --budget SECONDS)
#
# Exit code 0 when every part is ok, 1 when one is not, 2 when a GPU run finds no CUDA device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python3}" "$root/scripts/gpu_check.py" "$@"
