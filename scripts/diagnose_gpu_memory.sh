#!/usr/bin/env bash
# diagnose_gpu_memory.sh [RUN_DIR] [--project DIR] [--json]: the documented entry point of `yolosafe doctor`.
# The command's own arguments (RUN_DIR, --project, --json, -h/--help). All the logic is in the package
# (yolosafe/readers/doctor/); this only finds the environment's yolosafe: the `yolosafe` on PATH, else
# `python3 -m yolosafe`. See docs/scripts.md.
set -euo pipefail
if command -v yolosafe >/dev/null 2>&1; then
    exec yolosafe doctor "$@"
fi
exec python3 -m yolosafe doctor "$@"
