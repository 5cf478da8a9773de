#!/usr/bin/env bash
# fix_gpu_memory.sh [--yes] [--config FILE] [--run RUN_DIR]: the documented entry point of `yolosafe fix`.
# The command's own options (--config FILE or --config=FILE, --run, --yes, -h/--help; YOLOSAFE_RC_FILE names the
# shell rc file). All the logic is in the package (yolosafe/repair/); this only finds the environment's yolosafe:
# the `yolosafe` on PATH, else `python3 -m yolosafe`. See docs/scripts.md.
set -euo pipefail
if command -v yolosafe >/dev/null 2>&1; then
    exec yolosafe fix "$@"
fi
exec python3 -m yolosafe fix "$@"
