#!/usr/bin/env bash
# fix_gpu_memory.sh [--yes] [--config FILE] [--run RUN_DIR]: repair what diagnose_gpu_memory.sh finds, one
# proposal at a time, each asked y/N (default No).
#
#   1. processes holding GPU memory that are not a running yolosafe worker (nor this shell): kill PID (SIGTERM)
#   2. expandable_segments:True missing from PYTORCH_CUDA_ALLOC_CONF: an export in your shell rc file
#      (~/.bashrc, or $YOLOSAFE_RC_FILE), merged with your own allocator settings, added once
#   3. with --config FILE (a `yolosafe train --config` YAML) and OOMs in the last run: a smaller batch with the same
#      effective batch, and/or a smaller val_batch after a validation OOM
#
# Without a terminal on stdin every answer is No, unless --yes. Every file is backed up (FILE.bak.YYYYmmdd-HHMMSS)
# before it is changed. Exit status: 0, 1 when an accepted repair failed, 2 for a usage error.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=diagnose_gpu_memory.sh
source "$SCRIPT_DIR/diagnose_gpu_memory.sh"

STOP_WAIT_S=10     # how long a process may take to exit after SIGTERM
MARKER="# yolosafe fix_gpu_memory.sh"

ASSUME_YES=0
CONFIG=""
RUN=""
DONE=()     # what was changed
FAILED=()   # accepted, but it did not work
LEFT=()     # proposed and declined
BACKUPS=()

usage() {
    cat <<'EOF'
usage: bash scripts/fix_gpu_memory.sh [--yes] [--config FILE] [--run RUN_DIR]

Proposes repairs one by one and asks y/N for each (default No):
  1. stop processes that hold GPU memory and are not a running yolosafe worker (SIGTERM)
  2. add PYTORCH_CUDA_ALLOC_CONF with expandable_segments:True to your shell rc file
     (~/.bashrc; another file: YOLOSAFE_RC_FILE=~/.zshrc)
  3. with --config FILE: a smaller batch (same effective batch) and/or val_batch after the last run's OOMs
     (the last run: --run RUN_DIR, default the newest yolosafe.json under ./runs)

  --yes     accept every proposal (without it and without a terminal, every answer is No)
Files are backed up to FILE.bak.YYYYmmdd-HHMMSS before they are changed.
EOF
}

die_usage() {
    echo "fix_gpu_memory.sh: $1" >&2
    exit 2
}

# ask QUESTION: 0 for yes. Default No; --yes says yes; no terminal on stdin says No.
ask() {
    local answer=""
    if ((ASSUME_YES)); then
        printf '%s [y/N] y (--yes)\n' "$1"
        return 0
    fi
    if [[ ! -t 0 ]]; then
        printf '%s [y/N] n (no terminal: No; --yes accepts)\n' "$1"
        return 1
    fi
    printf '%s [y/N] ' "$1"
    read -r answer || answer=""
    [[ $answer =~ ^[Yy]([Ee][Ss])?$ ]]
}

# backup FILE: copy it to FILE.bak.YYYYmmdd-HHMMSS (never over an earlier backup); sets BACKUP.
backup() {
    local file=$1 n=1
    BACKUP="$file.bak.$(date +%Y%m%d-%H%M%S)"
    while [[ -e $BACKUP ]]; do
        n=$((n + 1))
        BACKUP="$file.bak.$(date +%Y%m%d-%H%M%S)-$n"
    done
    cp -p -- "$file" "$BACKUP"
    BACKUPS+=("$BACKUP")
    echo "    backup: $BACKUP"
}

# --- 1. processes holding GPU memory -------------------------------------------------------------------------------

# exited PID: gone, or a zombie waiting for its parent (it no longer holds GPU memory).
exited() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null || true)
    [[ -z $stat || $stat == Z* ]]
}

# stop_pid PID START DESCRIPTION: SIGTERM, then wait up to STOP_WAIT_S for it to exit.
stop_pid() {
    local pid=$1 start=$2 what=$3 err tries
    if [[ $(ps -o lstart= -p "$pid" 2>/dev/null || true) != "$start" ]]; then
        echo "    pid $pid is no longer the same process: left alone"
        return
    fi
    if ! err=$(kill -TERM "$pid" 2>&1); then
        echo "    kill $pid failed: ${err#*kill: }"
        FAILED+=("kill $pid ($what): ${err#*kill: } (another user's process needs: sudo kill $pid)")
        return
    fi
    for ((tries = 0; tries < STOP_WAIT_S * 5; tries++)); do
        exited "$pid" && break
        sleep 0.2
    done
    if exited "$pid"; then
        echo "    pid $pid exited"
        DONE+=("stopped pid $pid ($what)")
    else
        echo "    pid $pid is still running ${STOP_WAIT_S}s after SIGTERM; if you are sure: kill -KILL $pid"
        FAILED+=("pid $pid ($what) still running after SIGTERM: kill -KILL $pid if you are sure")
    fi
}

fix_processes() {
    local j k pid seen=" " gpus mib found=0 what owner
    section "1. processes holding GPU memory"
    read_gpus
    self_ancestors
    if ((${#GPU_IDX[@]} == 0)); then
        echo "no GPU: ${GPU_PROBLEM:-NVML found no GPU}; nothing to do"
        return
    fi
    if ! command -v ps >/dev/null 2>&1; then
        echo "ps is not installed: cannot tell what the pids are; nothing proposed (install procps)"
        return
    fi
    for j in "${!PROC_PID[@]}"; do
        pid=${PROC_PID[j]}
        [[ $seen != *" $pid "* ]] || continue
        seen+="$pid "
        gpus="" mib=0
        for k in "${!PROC_PID[@]}"; do
            if [[ ${PROC_PID[k]} == "$pid" ]]; then
                gpus+="${PROC_GPU[k]},"
                if [[ ${PROC_MIB[k]} =~ ^[0-9]+$ ]]; then mib=$((mib + PROC_MIB[k])); fi
            fi
        done
        classify_pid "$pid"
        printf 'pid %s, %s MiB on GPU %s: %s (%s, up %s)\n' "$pid" "$mib" "${gpus%,}" "${PS_ARGS:-?}" "$PS_USER" \
            "$PS_ETIME"
        echo "    $(kind_text "$KIND")"
        if ! is_stale_kind "$KIND"; then
            echo "    left alone"
            continue
        fi
        found=1
        what="${PS_ARGS:0:60}, $mib MiB on GPU ${gpus%,}"
        owner=$(ps -o uid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
        if ((ASSUME_YES)) && [[ $owner != "$(id -u)" ]]; then
            echo "    $PS_USER's process, not yours: --yes does not stop it (ask $PS_USER, or run without --yes)"
            LEFT+=("pid $pid ($what): $PS_USER's process, not stopped with --yes")
            continue
        fi
        if ask "    stop pid $pid (kill -TERM $pid)?"; then
            stop_pid "$pid" "$PS_START" "$what"
        else
            LEFT+=("pid $pid ($what) left running")
        fi
    done
    if ((!found)); then
        echo "no process to stop"
    fi
}

# --- 2. the allocator: expandable_segments:True in the shell rc file --------------------------------------------

fix_allocator() {
    local rc=${YOLOSAFE_RC_FILE:-${HOME:-}/.bashrc} status name value invalid="" expandable=unset merged="" line
    section "2. PyTorch allocator: expandable_segments"
    if [[ -z ${YOLOSAFE_RC_FILE:-} && -z ${HOME:-} ]]; then
        echo "HOME is not set: no rc file to edit (name one with YOLOSAFE_RC_FILE): skipped"
        return
    fi
    if [[ -z $PY ]]; then
        echo "python3 not found: skipped"
        return
    fi
    while IFS=$'\t' read -r status name value; do
        case $status in
            invalid) invalid=$value ;;
            expandable) expandable=$name ;;
            merged) merged=$name ;;
        esac
    done < <(ys_py alloc || true)
    if [[ -n $invalid ]]; then
        echo "$invalid"
        echo "fix this by hand first (torch and yolosafe train refuse it): nothing proposed"
        return
    fi
    if [[ $expandable == True ]]; then
        echo "expandable_segments is already on in this shell: nothing to do"
        return
    fi
    if [[ -f $rc ]] && line=$(grep -m 1 -nE \
        '^[[:space:]]*export[[:space:]]+PYTORCH_(CUDA_)?ALLOC_CONF=.*expandable_segments:True' "$rc"); then
        echo "$rc already turns it on (line ${line%%:*}); it applies to new shells: open one, or: source $rc"
        return
    fi
    echo "expandable_segments is $expandable in this shell: PyTorch outside yolosafe train (your scripts, notebooks)"
    echo "fragments its memory more. Proposed, appended to $rc:"
    line="export PYTORCH_CUDA_ALLOC_CONF='$merged'"
    echo "    $line"
    if [[ -n ${PYTORCH_ALLOC_CONF+set} ]]; then
        echo "    export PYTORCH_ALLOC_CONF='$merged'"
    fi
    if ! ask "    add it to $rc?"; then
        LEFT+=("$rc not changed (expandable_segments stays off outside yolosafe train)")
        return
    fi
    if [[ -f $rc ]]; then
        backup "$rc"
    else
        echo "    $rc does not exist yet: creating it"
    fi
    {
        printf '\n%s %s: fewer fragmentation OOMs in PyTorch\n' "$MARKER" "$(date '+%Y-%m-%d %H:%M:%S')"
        printf '%s\n' "$line"
        if [[ -n ${PYTORCH_ALLOC_CONF+set} ]]; then
            printf "export PYTORCH_ALLOC_CONF='%s'\n" "$merged"
        fi
    } >>"$rc"
    echo "    added to $rc (new shells get it; this one: source $rc)"
    DONE+=("$rc: export PYTORCH_CUDA_ALLOC_CONF='$merged' (new shells; now: source $rc)")
}

# --- 3. the training config ----------------------------------------------------------------------------------------

# Commands added to diagnose_gpu_memory.sh's Python helper (its load, oom_attempts... are at hand):
#   config-plan CONFIG RUN_DIR -> "note\tTEXT" and "propose\tkey=value ...\tTEXT" lines
#   config-write CONFIG BACKUP key=value ... -> rewrites CONFIG (comments and other keys kept), prints a diff
CONFIG_PY=$(cat <<'PYEOF'
import difflib, re

import yaml


def read_config(path):
    with open(path) as fh:
        text = fh.read()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SystemExit("%s: not a mapping of yolosafe options" % path)
    return text, data


def option(data, key):
    """A yolosafe option from the config, spelled with dashes or underscores (as cli.load_config accepts)."""
    for name in (key, key.replace("_", "-")):
        if name in data:
            return data[name]
    return None


def gpu_count(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, int):
        return 1
    text = str(value).strip().lower()
    if text == "cpu":
        return 1
    if text == "all":
        return None
    return len([w for w in text.split(",") if w.strip()])


def config_plan(config, run_dir):
    _, data = read_config(config)
    story = load(os.path.join(run_dir, "yolosafe.json"))
    if not isinstance(story, dict):
        print("note\t%s/yolosafe.json cannot be read: nothing proposed" % run_dir)
        return
    run_plan = story.get("plan") or {}
    attempts = story.get("attempts") or []
    found = oom_attempts(run_dir, story)
    if not found:
        print("note\tthe last run (%s, %s) had no OOM: nothing to change" % (run_dir, story.get("outcome")))
        return
    world = gpu_count(option(data, "gpus")) or max(len(run_plan.get("gpus") or []), 1)
    try:
        batch = int(option(data, "batch") or run_plan.get("batch") or 16)
        eff = int(option(data, "effective_batch") or run_plan.get("effective_batch") or batch)
        val = option(data, "val_batch")
        val = None if val is None else int(val)
    except (TypeError, ValueError):
        raise SystemExit("%s: batch, effective_batch and val_batch must be whole numbers" % config)
    per_gpu = max(batch // world, 1)
    last = attempts[-1] if attempts else {}
    target_per = target_val = None
    if story.get("outcome") == "completed" and last.get("outcome") == "completed":
        why = "attempt %s of the run completed with it after the OOMs" % last.get("attempt")
        target_per, per_why = last.get("per_gpu_batch"), why
        target_val, val_why = last.get("val_batch"), why
    else:
        train = [a for a in found if a.get("phase") not in VAL_PHASES and a.get("per_gpu_batch")]
        if train:
            a = min(train, key=lambda a: a["per_gpu_batch"])
            target_per = a["per_gpu_batch"] // 2
            per_why = "half of %s per GPU, which ran out of memory in training at epoch %s (attempt %s)" % (
                a["per_gpu_batch"], a.get("epoch"), a.get("attempt"))
        valid = [a for a in found if a.get("phase") in VAL_PHASES and a.get("val_batch")]
        if valid:
            a = min(valid, key=lambda a: a["val_batch"])
            target_val = a["val_batch"] // 2
            val_why = "half of %s per GPU, which ran out of memory in %s at epoch %s (attempt %s)" % (
                a["val_batch"], "validation" if a.get("phase") == "val" else "the final validation",
                a.get("epoch"), a.get("attempt"))
    if target_per is not None:
        if target_per < 1:
            print("note\tbatch: 1 image per GPU already ran out of memory in training: a smaller imgsz or model, "
                  "or GPUs with more free memory")
        elif per_gpu <= target_per:
            print("note\tbatch: %s (%s per GPU) is already at or below %s per GPU: unchanged" % (
                batch, per_gpu, target_per))
        else:
            new = target_per * world
            eff = max(eff, new)
            print("propose\tbatch=%d effective_batch=%d\tbatch %s -> %d (%s -> %d per GPU over %d GPU(s)), "
                  "effective_batch %s kept (accumulation %s -> %s): %s" % (
                      new, eff, batch, new, per_gpu, target_per, world, eff, max(round(eff / batch), 1),
                      max(round(eff / new), 1), per_why))
    if target_val is not None:
        current = val if val is not None else per_gpu
        shown = "%s" % val if val is not None else "%s (the default: the per-GPU batch)" % per_gpu
        if target_val < 1:
            print("note\tval_batch: 1 per GPU already ran out of memory in validation: train with val=False "
                  "(args) and validate afterwards, or a smaller imgsz")
        elif current <= target_val:
            print("note\tval_batch: %s is already at or below %s: unchanged" % (shown, target_val))
        else:
            print("propose\tval_batch=%d\tval_batch %s -> %d per GPU: %s" % (target_val, shown, target_val, val_why))


def config_write(config, backup, *assignments):
    text, data = read_config(config)
    changes = {}
    for item in assignments:
        key, _, value = item.partition("=")
        changes[key] = int(value)
    lines = text.splitlines(True)
    for key, value in changes.items():
        spellings = [key, key.replace("_", "-")]
        pattern = re.compile(r"^(%s)(\s*:[ \t]*)([^#\n]*?)([ \t]*#.*)?(\r?\n)?$" % "|".join(map(re.escape, spellings)))
        for i, line in enumerate(lines):
            match = pattern.match(line)
            if match and match.group(3).strip():
                lines[i] = "%s%s%d%s%s" % (match.group(1), match.group(2), value, match.group(4) or "",
                                           match.group(5) or "")
                break
        else:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append("%s: %d\n" % (key, value))
    new_text = "".join(lines)
    expected = {k: v for k, v in data.items() if k.replace("-", "_") not in changes}
    expected.update(changes)
    parsed = yaml.safe_load(new_text) or {}
    normalized = {k.replace("-", "_") if k.replace("-", "_") in changes else k: v for k, v in parsed.items()}
    if normalized != expected:  # an unusual layout (flow style, a value on the next line): rewrite the whole file
        print("note: rewrote %s as plain YAML (its layout could not be edited in place; comments are lost)" % config)
        new_text = yaml.safe_dump(expected, sort_keys=False, default_flow_style=False)
    with open(config, "w") as fh:
        fh.write(new_text)
    with open(backup) as fh:
        old_text = fh.read()
    sys.stdout.writelines(difflib.unified_diff(old_text.splitlines(True), new_text.splitlines(True), backup, config))
    try:
        from yolosafe import cli

        cli.load_config(config)
    except ImportError:
        pass
    except Exception as exc:
        print("warning: yolosafe does not accept the new %s: %s" % (config, exc))


COMMANDS.update({"config-plan": config_plan, "config-write": config_write})
PYEOF
)

config_py() {
    "$PY" -c "$YS_PY"$'\n'"$CONFIG_PY"$'\n'"$YS_PY_MAIN" "$@"
}

fix_config() {
    local run=$RUN status assign text accepted=() words=() out
    section "3. training config"
    if [[ -z $CONFIG ]]; then
        echo "no --config FILE given: skipped (the batch to use: see the verdict of diagnose_gpu_memory.sh)"
        return
    fi
    if [[ -z $run && -d runs ]]; then
        run=$(ys_py find-run runs || true)
    fi
    if [[ -z $run ]]; then
        echo "no yolosafe run found under ./runs (give one with --run RUN_DIR): nothing to base a change on"
        return
    fi
    echo "config $CONFIG, last run $run"
    if ! out=$(config_py config-plan "$CONFIG" "$run" 2>&1); then
        echo "cannot read the config or the run: $out"
        FAILED+=("$CONFIG: cannot be read ($out)")
        return
    fi
    # fd 3: stdin stays the terminal that ask reads the answers from
    while IFS=$'\t' read -r -u 3 status assign text; do
        case $status in
            note) echo "$assign" ;;
            propose)
                echo "$text"
                if ask "    change $CONFIG: ${assign}?"; then
                    read -ra words <<<"$assign"
                    accepted+=("${words[@]}")
                else
                    LEFT+=("$CONFIG: $assign not applied")
                fi ;;
        esac
    done 3<<<"$out"
    if ((${#accepted[@]} == 0)); then
        return
    fi
    backup "$CONFIG"
    if config_py config-write "$CONFIG" "$BACKUP" "${accepted[@]}" 2>&1 | sed 's/^/    /'; then
        DONE+=("$CONFIG: ${accepted[*]}")
    else
        FAILED+=("$CONFIG could not be rewritten (unchanged copy: $BACKUP)")
    fi
}

# --- summary -------------------------------------------------------------------------------------------------------

summary() {
    local item
    section "summary"
    if ((${#DONE[@]} == 0)); then
        echo "nothing changed"
    else
        echo "done:"
        for item in "${DONE[@]}"; do echo "  - $item"; done
    fi
    if ((${#FAILED[@]})); then
        echo "failed:"
        for item in "${FAILED[@]}"; do echo "  - $item"; done
    fi
    if ((${#LEFT[@]})); then
        echo "not done (answered No):"
        for item in "${LEFT[@]}"; do echo "  - $item"; done
    fi
    if ((${#BACKUPS[@]})); then
        echo "backups:"
        for item in "${BACKUPS[@]}"; do echo "  - $item"; done
    fi
    echo "check: yolosafe gpus; bash scripts/diagnose_gpu_memory.sh"
}

fix_main() {
    while (($#)); do
        case $1 in
            -y | --yes) ASSUME_YES=1 ;;
            --config) (($# > 1)) || die_usage "--config needs a FILE"
                      CONFIG=$2; shift ;;
            --config=*) CONFIG=${1#--config=} ;;
            --run) (($# > 1)) || die_usage "--run needs a RUN_DIR"
                   RUN=${2%/}; shift ;;
            --run=*) RUN=${1#--run=}; RUN=${RUN%/} ;;
            -h | --help) usage; exit 0 ;;
            *) die_usage "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    if [[ -n $CONFIG && ! -f $CONFIG ]]; then
        die_usage "--config $CONFIG: no such file"
    fi
    if [[ -n $RUN && ! -f $RUN/yolosafe.json ]]; then
        die_usage "--run $RUN: not a yolosafe run directory (no yolosafe.json)"
    fi
    find_python
    echo "GPU memory repair, $(date '+%Y-%m-%d %H:%M:%S'): each change is asked first (default No)"
    fix_processes
    fix_allocator
    fix_config
    summary
    if ((${#FAILED[@]})); then
        exit 1
    fi
}

fix_main "$@"
