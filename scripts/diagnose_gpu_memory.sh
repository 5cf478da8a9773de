#!/usr/bin/env bash
# diagnose_gpu_memory.sh [RUN_DIR]: explain the GPU memory of this machine and of the last yolosafe run.
#
# Read-only. Sections: machine (GPUs, the processes holding their memory, likely stale ones), environment
# (allocator settings, CUDA_VISIBLE_DEVICES, stray DDP variables), last run (RUN_DIR, else the newest yolosafe.json
# under ./runs: outcome, attempts, failure records, memory peaks) and a verdict. Exit 0 after diagnosing; exit 2
# with one line on stderr for a bad argument or a RUN_DIR that is not a yolosafe run directory.
#
# fix_gpu_memory.sh sources this file for its helpers; main only runs when the file is executed.
set -euo pipefail

BUSY_MIB=1024  # memory of other processes on a GPU above which the verdict mentions it

usage() {
    cat <<'EOF'
usage: bash scripts/diagnose_gpu_memory.sh [RUN_DIR]

Explains the GPU memory of this machine and of a yolosafe run (RUN_DIR, default: the newest yolosafe.json under
./runs), and ends with likely causes and what to do. Changes nothing; see scripts/fix_gpu_memory.sh for repairs.
EOF
}

# --- the Python that runs yolosafe: JSON/YAML parsing (no jq) ------------------------------------------------------

find_python() {
    # The interpreter of the yolosafe script itself (its virtualenv), else python3 beside it, else python3.
    local exe shebang
    PY=""
    if exe=$(command -v yolosafe 2>/dev/null); then
        IFS= read -r shebang <"$exe" || true
        shebang=${shebang#\#!}
        shebang=${shebang%% *}
        if [[ $shebang == /* && -x $shebang ]]; then
            PY=$shebang
        elif [[ -x "$(dirname "$exe")/python" ]]; then
            PY="$(dirname "$exe")/python"
        fi
    fi
    if [[ -z $PY ]]; then
        PY=$(command -v python3 || true)
    fi
}

# One helper with sub-commands (COMMANDS); data comes on stdin or as arguments. Written for any Python >= 3.8.
YS_PY=$(cat <<'PYEOF'
import glob, json, os, sys

VAL_PHASES = ("val", "final")


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def num(value, unit=" MiB"):
    if value is None:
        return "?"
    value = float(value)
    return ("%.1f%s" if value < 1000 and value != int(value) else "%.0f%s") % (value, unit)


def gib(value):
    return "?" if value is None else "%.1f GiB" % (float(value) / 1024)


def clean(value):
    return "-" if value is None else str(value).replace("\t", " ").replace("\n", " ")


def gpus():
    """yolosafe gpus --json on stdin -> tab-separated records: I (inventory), G (GPU), P (process)."""
    data = json.load(sys.stdin)
    print("\t".join(["I"] + [clean(data.get(k)) for k in ("backend", "driver", "cuda", "problem")]))
    for g in data.get("gpus", []):
        fields = [g.get("index"), g.get("name"), num(g.get("total_mib"), ""), num(g.get("used_mib"), ""),
                  num(g.get("free_mib"), ""), g.get("utilization")]
        print("\t".join(["G"] + [clean(f) for f in fields]))
        for p in g.get("processes", []):
            print("\t".join(["P", clean(g.get("index")), clean(p.get("pid")), num(p.get("used_mib"), "")]))


def split_items(conf):
    items, start, depth = [], 0, 0
    for i, char in enumerate(conf):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(conf[start:i])
            start = i + 1
    items.append(conf[start:])
    return [item.strip() for item in items if item.strip()]


def alloc():
    """The allocator variables of this environment: whether torch will accept them, whether expandable_segments is
    on, and the merged value with expandable_segments:True (the user's keys kept, as yolosafe merges them)."""
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    try:
        from yolosafe import allocator
    except ImportError:
        allocator = None
    options, ok = {}, True
    for name in names:
        if name not in os.environ:
            continue
        value = os.environ[name]
        try:
            if allocator is not None:
                parsed = allocator.parse(value, name)
                for item in split_items(value):
                    key, _, raw = (part.strip() for part in item.partition(":"))
                    if parsed.get(key) in ("True", "False") and raw != parsed[key]:
                        print("note\t%s\t'%s': torch itself accepts only True/False; yolosafe corrects it for its "
                              "workers, your other scripts would fail" % (name, item))
                options.update(parsed)
            else:
                for item in split_items(value):
                    key, _, val = item.partition(":")
                    options[key.strip()] = val.strip()
            print("valid\t%s\t%s" % (name, value))
        except ValueError as exc:
            ok = False
            print("invalid\t%s\t%s" % (name, " ".join(str(exc).split())))
    print("expandable\t%s" % options.get("expandable_segments", "unset"))
    if ok:
        options["expandable_segments"] = "True"
        print("merged\t%s" % ",".join("%s:%s" % kv for kv in options.items()))


def find_run(root):
    """The directory of the newest yolosafe.json under root (by modification time), or nothing."""
    found = []
    for path in glob.glob(os.path.join(root, "**", "yolosafe.json"), recursive=True):
        try:
            found.append((os.stat(path).st_mtime, path))
        except OSError:
            continue
    if found:
        print(os.path.dirname(max(found)[1]))


def records(run_dir):
    """failure-N-rankR.json, in attempt then rank order, each with its file name."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "failure-*-rank*.json")):
        name = os.path.basename(path)
        try:
            attempt, rank = name[len("failure-"):-len(".json")].split("-rank")
            key = (int(attempt), int(rank))
        except ValueError:
            continue
        record = load(path)
        if isinstance(record, dict):
            found.append((key, name, record))
    return [(name, record) for _, name, record in sorted(found)]


def oom_attempts(run_dir, story):
    """The OOMs of a run: its attempts that ended in one (yolosafe.json), plus the OOM records of attempts it does not
    list as such (a supervisor that died before writing the outcome), in the same shape."""
    found = [a for a in story.get("attempts") or [] if a.get("outcome") == "oom"]
    listed = set(a.get("attempt") for a in found)
    for _, record in records(run_dir):
        if record.get("oom") and record.get("attempt") not in listed:
            listed.add(record.get("attempt"))
            found.append({"attempt": record.get("attempt"), "phase": record.get("phase"), "epoch": record.get("epoch"),
                          "rank": record.get("rank"), "gpu": record.get("gpu"), "per_gpu_batch": record.get("batch"),
                          "val_batch": record.get("val_batch")})
    return found


def gpu_of(record, plan_gpus):
    """The NVML index of the GPU a rank died on: PyTorch's device number (or the rank) mapped through --gpus."""
    index = record.get("gpu")
    if index is None:
        index = (record.get("figures") or {}).get("gpu")
    if index is None and record.get("rank") is not None:
        index = max(int(record["rank"]), 0)
    if index is None or not plan_gpus:
        return None
    return plan_gpus[index] if 0 <= index < len(plan_gpus) else None


def epoch_text(epoch, epochs):
    if epoch is None:
        return "epoch ?"
    shown = "/%s" % epochs if epochs else ""
    return "epoch %s (0-based; Ultralytics shows %s%s)" % (epoch, int(epoch) + 1, shown)


def others_at_launch(story):
    """{NVML index: (MiB, pids)} held by other processes on the run's GPUs when it started."""
    found = {}
    for g in story.get("gpus") or []:
        procs = g.get("processes") or []
        mib = sum(p.get("used_mib") or 0 for p in procs)
        if procs or (g.get("used_mib") or 0) > 0:
            found[g.get("index")] = (max(mib, g.get("used_mib") or 0), [p.get("pid") for p in procs])
    return found


OUTCOMES = {
    "completed": "training finished",
    "oom": "the last attempt ran out of GPU memory",
    "oom_exhausted": "still out of memory after the retries (yolosafe exit 3)",
    "failed": "failed for another reason than memory (not retried)",
    "killed": "the worker was killed by a signal yolosafe did not send (SIGKILL: host OOM killer or kill -9)",
    "interrupted": "stopped by Ctrl-C/SIGTERM; resumable",
    "running": "running now, or its supervisor died without recording an outcome",
    "supervisor_died": "its supervisor died while training (found by a later yolosafe command); resumable",
}


def run(run_dir):
    story = load(os.path.join(run_dir, "yolosafe.json"))
    if not isinstance(story, dict):
        print("yolosafe.json cannot be read (being written, or not JSON)")
        return
    plan = story.get("plan") or {}
    plan_gpus = plan.get("gpus") or []
    outcome = story.get("outcome", "?")
    print("outcome     %s: %s" % (outcome, OUTCOMES.get(outcome, "?")))
    if story.get("command"):
        print("command     %s" % " ".join(str(c) for c in story["command"]))
    shown = dict((k, "?" if v is None else v) for k, v in plan.items())
    print("plan        GPUs %s, batch %s total = %s per GPU, val batch %s per GPU, effective batch %s "
          "(accumulate %s), imgsz %s, epochs %s" % tuple(
              [",".join(map(str, plan_gpus)) or "cpu"] + [shown.get(k, "?") for k in (
                  "batch", "per_gpu_batch", "val_batch", "effective_batch", "accumulate", "imgsz", "epochs")]))
    conf = story.get("allocator") or {}
    if len(set(conf.values())) == 1:
        print("allocator   %s (%s of the workers)" % (list(conf.values())[0], " and ".join(conf)))
    else:
        for name, value in conf.items():
            print("allocator   %s=%s (of the workers)" % (name, value))
    if story.get("simulated_on_cpu"):
        print("note        fake GPUs (YOLOSAFE_FAKE_GPUS): this run trained on the CPU")
    for index, (mib, pids) in sorted(others_at_launch(story).items(), key=lambda kv: str(kv[0])):
        who = " (pids %s)" % ", ".join(map(str, pids)) if pids else ""
        print("at launch   GPU %s: %s already used by other processes%s" % (index, num(mib), who))
    attempts = story.get("attempts") or []
    if attempts:
        print("attempts")
        columns = ("#", "mode", "batch", "per-GPU", "val", "accum", "outcome", "phase", "epoch", "next")
        rows = [[a.get("attempt"), a.get("mode"), a.get("batch"), a.get("per_gpu_batch"), a.get("val_batch"),
                 a.get("accumulate"), a.get("outcome", "running"), a.get("phase"), a.get("epoch"), a.get("next")]
                for a in attempts]
        rows = [["-" if v is None else str(v) for v in row] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        for row in [list(columns)] + rows:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    failures = records(run_dir)
    print("failures" if failures else "failures    none recorded (failure-N-rankR.json)")
    for name, record in failures:
        print("  " + failure_line(name, record, plan_gpus, plan.get("epochs")))


def failure_line(name, record, plan_gpus, epochs):
    where = "%s at %s" % (record.get("phase") or "?", epoch_text(record.get("epoch"), epochs))
    gpu = gpu_of(record, plan_gpus)
    rank = record.get("rank")
    on = ", rank %s" % rank if rank is not None and rank >= 0 else ""
    on += ", GPU %s" % gpu if gpu is not None else ""
    if not record.get("oom"):
        message = (record.get("message") or "")[:160]
        return "%s: %s in %s%s (not an OOM): %s" % (name, record.get("error", "error"), where, on, message)
    f = record.get("figures") or {}
    parts = []
    if "tried_mib" in f:
        parts.append("tried to allocate %s" % num(f["tried_mib"]))
    if "free_mib" in f:
        parts.append("%s free of %s" % (num(f["free_mib"]), gib(f.get("total_mib"))))
    if "allocated_mib" in f:
        parts.append("%s allocated by PyTorch" % gib(f["allocated_mib"]))
    if "reserved_unallocated_mib" in f:
        parts.append("%s reserved but unallocated" % num(f["reserved_unallocated_mib"]))
    batches = "batch %s, val batch %s" % (record.get("batch", "?"), record.get("val_batch", "?"))
    return "%s: OOM in %s%s (%s)%s" % (name, where, on, batches, ": " + ", ".join(parts) if parts else "")


def summary(path):
    """memory_summary.json: NVML peaks per GPU and phase."""
    data = load(path)
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict):
        print("  %s cannot be read" % path)
        return
    order = {"train": 0, "val": 1, "final": 2}
    for gpu, info in sorted(data["gpus"].items(), key=lambda kv: str(kv[0]).zfill(4)):
        print("  GPU %s: total %s, peak %s, headroom %s, other processes up to %s" % (
            gpu, gib(info.get("total_mib")), gib(info.get("peak_used_mib")), gib(info.get("headroom_mib")),
            gib(info.get("peak_others_mib"))))
        phases = info.get("phases") or {}
        for phase in sorted(phases, key=lambda p: (order.get(p, 9), p)):
            p = phases[phase]
            epoch = p.get("epoch_of_peak")
            extra = ", epoch %s" % epoch if epoch is not None else ""
            if p.get("torch_reserved_minus_allocated_mib") is not None:
                extra += ", torch reserved-allocated %s" % num(p["torch_reserved_minus_allocated_mib"])
            print("    %-6s peak %s (ours %s, others %s%s)" % (
                phase, gib(p.get("peak_used_mib")), gib(p.get("ours_at_peak_mib")), gib(p.get("others_at_peak_mib")),
                extra))


def count(ooms):
    return "an OOM" if len(ooms) == 1 else "%d OOMs" % len(ooms)


def verdict(run_dir, summary_path=""):
    """Likely causes and what to do, from yolosafe.json, the failure records and memory_summary.json."""
    story = load(os.path.join(run_dir, "yolosafe.json"))
    if not isinstance(story, dict):
        return
    plan = story.get("plan") or {}
    plan_gpus = plan.get("gpus") or []
    world = max(len(plan_gpus), 1)
    attempts = story.get("attempts") or []
    outcome = story.get("outcome")
    ooms = [r for _, r in records(run_dir) if r.get("oom")]
    found = oom_attempts(run_dir, story)
    last = attempts[-1] if attempts else {}
    eff = last.get("nbs") or plan.get("effective_batch")
    recovered = outcome == "completed" and bool(found)
    if recovered:
        print("the run recovered by itself: attempt %s completed with batch %s (%s per GPU) and val batch %s per GPU;"
              " start the next run with them: --batch %s --val-batch %s --effective-batch %s" % (
                  last.get("attempt"), last.get("batch"), last.get("per_gpu_batch"), last.get("val_batch"),
                  last.get("batch"), last.get("val_batch"), eff))
    val = [a for a in found if a.get("phase") in VAL_PHASES]
    train = [a for a in found if a.get("phase") not in VAL_PHASES]
    if val:
        a = min(val, key=lambda a: a.get("val_batch") or 1e9)
        vb = a.get("val_batch") or "?"
        gpu = gpu_of(a, plan_gpus)
        advice = "" if recovered else "; use --val-batch %s (per GPU; Ultralytics alone uses twice the train batch)" % (
            max(vb // 2, 1) if vb != "?" else "with half of it")
        print("%s in validation, the last at %s on GPU %s with val batch %s per GPU: validation is the peak%s"
              % (count(val), epoch_text(a.get("epoch"), plan.get("epochs")), "?" if gpu is None else gpu, vb, advice))
    if train:
        a = min(train, key=lambda a: a.get("per_gpu_batch") or 1e9)
        per = a.get("per_gpu_batch") or 0
        gpu = gpu_of(a, plan_gpus)
        where = "%s in training, the last at %s on GPU %s with %s per GPU" % (
            count(train), epoch_text(a.get("epoch"), plan.get("epochs")), "?" if gpu is None else gpu, per)
        if recovered or not per:
            print(where)
        elif per > 1:
            print("%s: --batch %s --effective-batch %s halves the per-GPU batch and keeps the effective batch "
                  "(accumulation doubles)" % (where, per // 2 * world, eff))
        else:
            print("%s: a smaller --imgsz, a smaller model, or GPUs with more free memory" % where)
    unallocated = max([(r.get("figures") or {}).get("reserved_unallocated_mib") or 0 for r in ooms] or [0])
    expandable = "expandable_segments:True" in ",".join((story.get("allocator") or {}).values())
    if unallocated > 1024:
        print("%s was reserved by PyTorch but unallocated at the OOM (fragmentation)%s" % (
            num(unallocated), ", although expandable_segments was on: a smaller batch is the remedy" if expandable
            else ": keep PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (yolosafe's default; do not turn it off)"))
    elif ooms:
        print("fragmentation is not the cause (at most %s reserved but unallocated at the OOM): the GPU was really "
              "full at that moment; nvidia-smi after the crash shows the memory free again" % num(unallocated))
    busy = {i: v for i, v in others_at_launch(story).items() if v[0] > 1024}
    if busy:
        keep = [g for g in plan_gpus if g not in busy]
        print("GPU(s) %s already held memory of other processes when the run started: stop them, or exclude them "
              "with --gpus %s" % (", ".join(map(str, sorted(busy, key=str))), ",".join(map(str, keep)) or "cpu"))
    if outcome == "killed":
        print("the worker was SIGKILLed: if the host ran out of RAM, the kernel's OOM killer did it (dmesg | grep -i "
              "oom); use fewer dataloader workers (workers=2) and cache=False; resume with yolosafe train --resume")
    if outcome == "failed":
        print("the run failed for another reason than memory: read train.log in the run directory")
    data = load(summary_path) if summary_path else None
    for gpu, info in sorted(((data or {}).get("gpus") or {}).items()):
        phases = info.get("phases") or {}
        train_peak = (phases.get("train") or {}).get("peak_used_mib") or 0
        val_peak = max([(phases.get(p) or {}).get("peak_used_mib") or 0 for p in VAL_PHASES])
        if val_peak > train_peak * 1.2 and val_peak > 1024:
            print("GPU %s peaks in validation (%s vs %s in training): lower --val-batch first" % (
                gpu, gib(val_peak), gib(train_peak)))


COMMANDS = {"gpus": gpus, "alloc": alloc, "find-run": find_run, "run": run, "summary": summary, "verdict": verdict}
PYEOF
)
# The line that runs a command: `ys_py COMMAND ARGS...` (fix_gpu_memory.sh appends its own commands before it).
YS_PY_MAIN='COMMANDS[sys.argv[1]](*sys.argv[2:])'

ys_py() {
    "$PY" -c "$YS_PY"$'\n'"$YS_PY_MAIN" "$@"
}

section() {
    printf '\n== %s ==\n' "$1"
}

# --- GPUs and the processes holding their memory --------------------------------------------------------------------

# read_gpus: fills GPU_* (one entry per GPU) and PROC_* (one per GPU x process), GPU_PROBLEM and GPU_BACKEND.
read_gpus() {
    local out err rc=0 kind a b c d e
    GPU_IDX=() GPU_NAME=() GPU_TOTAL=() GPU_USED=() GPU_FREE=()
    PROC_GPU=() PROC_PID=() PROC_MIB=()
    GPU_PROBLEM="" GPU_BACKEND="" GPU_DRIVER="" GPU_CUDA=""
    if ! command -v yolosafe >/dev/null 2>&1; then
        GPU_PROBLEM="yolosafe is not on PATH (activate its virtualenv)"
        return
    fi
    err=$(mktemp)
    out=$(yolosafe gpus --json 2>"$err") || rc=$?
    if ((rc != 0)); then
        GPU_PROBLEM=$(head -n 1 "$err")
        GPU_PROBLEM=${GPU_PROBLEM:-"yolosafe gpus --json exited with status $rc"}
        rm -f "$err"
        return
    fi
    rm -f "$err"
    while IFS=$'\t' read -r kind a b c d e _; do
        case $kind in
            I) GPU_BACKEND=$a GPU_DRIVER=$b GPU_CUDA=$c
               if [[ $d != "-" ]]; then GPU_PROBLEM=$d; fi ;;
            G) GPU_IDX+=("$a") GPU_NAME+=("$b") GPU_TOTAL+=("$c") GPU_USED+=("$d") GPU_FREE+=("$e") ;;
            P) PROC_GPU+=("$a") PROC_PID+=("$b") PROC_MIB+=("$c") ;;
        esac
    done < <(printf '%s' "$out" | ys_py gpus || printf 'I\t-\t-\t-\tcannot parse yolosafe gpus --json\n')
}

# gpu_lists_processes INDEX: NVML listed at least one process on that GPU.
gpu_lists_processes() {
    local gpu
    for gpu in "${PROC_GPU[@]+"${PROC_GPU[@]}"}"; do
        [[ $gpu == "$1" ]] && return 0
    done
    return 1
}

# has_nvidia_fd PID: the process has a /dev/nvidia* device open (every process holding CUDA memory has).
has_nvidia_fd() {
    local fd
    for fd in /proc/"$1"/fd/*; do
        [[ $(readlink "$fd" 2>/dev/null) == /dev/nvidia* ]] && return 0
    done
    return 1
}

# The ancestors of this shell: never proposed for killing (killing one would end this session).
self_ancestors() {
    local pid=$$ ppid
    SELF_PIDS=" $$ "
    command -v ps >/dev/null 2>&1 || return 0
    while [[ $pid =~ ^[0-9]+$ ]] && ((pid > 1)); do
        ppid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') || break
        [[ -n $ppid ]] || break
        SELF_PIDS+="$ppid "
        pid=$ppid
    done
}

# is_yolosafe_worker PID: the process or one of its ancestors runs `python -m yolosafe.worker` (DDP ranks descend
# from the worker through torch.distributed.run).
is_yolosafe_worker() {
    local pid=$1 depth args
    for ((depth = 0; depth < 16; depth++)); do
        if [[ ! $pid =~ ^[0-9]+$ ]] || ((pid <= 1)); then
            return 1
        fi
        args=$(ps -o args= -p "$pid" 2>/dev/null) || return 1
        [[ $args == *yolosafe.worker* ]] && return 0
        pid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') || return 1
    done
    return 1
}

# classify_pid PID: sets PS_USER PS_ETIME PS_ARGS PS_START and KIND, one of
#   self (this shell or an ancestor), worker (a running yolosafe worker or DDP rank), jupyter, python, desktop,
#   other, unseen (no such pid here), mismatch (the pid here has no /dev/nvidia* open: another pid namespace),
#   zombie (it has exited; its parent has not reaped it yet).
classify_pid() {
    local pid=$1 line exe stat
    PS_USER="?" PS_ETIME="?" PS_ARGS="" PS_START="" KIND=unseen
    command -v ps >/dev/null 2>&1 || return 0
    line=$(ps -o pid=,user=,etime=,args= -p "$pid" 2>/dev/null) || return 0
    [[ -n $line ]] || return 0
    read -r _ PS_USER PS_ETIME PS_ARGS <<<"$line"
    # shellcheck disable=SC2034  # PS_START: fix_gpu_memory.sh checks it before a kill (a reused pid)
    PS_START=$(ps -o lstart= -p "$pid" 2>/dev/null || true)
    stat=$(ps -o stat= -p "$pid" 2>/dev/null || true)
    exe=${PS_ARGS%% *}
    exe=${exe##*/}
    if [[ $stat == Z* ]]; then
        KIND=zombie
    elif [[ $SELF_PIDS == *" $pid "* ]]; then
        KIND=self
    elif is_yolosafe_worker "$pid"; then
        KIND=worker
    elif [[ $GPU_BACKEND == nvml && -r /proc/$pid/fd ]] && ! has_nvidia_fd "$pid"; then
        KIND=mismatch
    elif [[ $PS_ARGS =~ ipykernel|jupyter|colab_kernel ]]; then
        KIND=jupyter
    elif [[ $exe =~ ^(Xorg|Xwayland|gnome-shell|kwin_x11|kwin_wayland|plasmashell|gdm|sddm) ]]; then
        KIND=desktop
    elif [[ $exe =~ ^python ]]; then
        KIND=python
    else
        KIND=other
    fi
}

kind_text() {
    case $1 in
        self) echo "this shell or one of its parents" ;;
        worker) echo "a running yolosafe worker (python -m yolosafe.worker) or one of its DDP ranks" ;;
        jupyter) echo "LIKELY STALE: a Jupyter/IPython kernel keeps its CUDA memory until it is shut down" ;;
        python) echo "LIKELY STALE: a Python process that is not a running yolosafe worker (or someone's own" \
                    "training: check before stopping it)" ;;
        desktop) echo "the desktop's display server: leave it" ;;
        other) echo "another program, not yolosafe: stop it if you do not know it" ;;
        zombie) echo "has exited (a zombie its parent has not reaped yet): it holds no GPU memory any more" ;;
        unseen) echo "not visible from here: NVML cannot always see pids inside containers (another pid namespace)" ;;
        mismatch) echo "the process with this pid here has no /dev/nvidia* open: NVML reports pids of another pid" \
                      "namespace (a container)" ;;
    esac
}

# A holder that fix_gpu_memory.sh may propose to stop.
is_stale_kind() {
    [[ $1 == jupyter || $1 == python || $1 == other ]]
}

in_container() {
    [[ -f /.dockerenv || -f /run/.containerenv ]] || grep -qsE 'docker|kubepods|containerd|lxc' /proc/1/cgroup
}

# --- sections --------------------------------------------------------------------------------------------------------

VERDICT=()      # machine and environment findings
RUN_VERDICT=()  # findings about the run: printed first

machine_section() {
    local i j pid others unseen=0 note busy="" idle="" text
    section "machine"
    read_gpus
    self_ancestors
    if ((${#GPU_IDX[@]} == 0)); then
        echo "no GPU: ${GPU_PROBLEM:-NVML found no GPU}"
        VERDICT+=("no GPU is visible here (${GPU_PROBLEM:-NVML found no GPU}): yolosafe train would run on the CPU")
    else
        echo "backend ${GPU_BACKEND} (driver ${GPU_DRIVER}, CUDA ${GPU_CUDA})"
        if [[ $GPU_BACKEND == fake ]]; then
            echo "note: YOLOSAFE_FAKE_GPUS is set: these GPUs are fake"
        fi
    fi
    for i in "${!GPU_IDX[@]}"; do
        printf 'GPU %s  %s: %s MiB used, %s MiB free of %s MiB\n' "${GPU_IDX[i]}" "${GPU_NAME[i]}" \
            "${GPU_USED[i]}" "${GPU_FREE[i]}" "${GPU_TOTAL[i]}"
        others=0  # MiB of processes that are not yolosafe's nor this shell's
        for j in "${!PROC_PID[@]}"; do
            [[ ${PROC_GPU[j]} == "${GPU_IDX[i]}" ]] || continue
            pid=${PROC_PID[j]}
            classify_pid "$pid"
            text=$(kind_text "$KIND")
            printf '    pid %-7s %8s MiB  %-10s up %-12s %s\n' "$pid" "${PROC_MIB[j]}" "$PS_USER" "$PS_ETIME" \
                "${PS_ARGS:-?}"
            printf '        -> %s\n' "$text"
            if [[ $KIND == unseen || $KIND == mismatch ]]; then
                unseen=1
            fi
            if [[ $KIND != worker && $KIND != self && ${PROC_MIB[j]} =~ ^[0-9]+$ ]]; then
                others=$((others + PROC_MIB[j]))
            fi
            if is_stale_kind "$KIND"; then
                VERDICT+=("pid $pid (${PS_ARGS:0:60}; $PS_USER, up $PS_ETIME) holds ${PROC_MIB[j]} MiB on GPU\
 ${GPU_IDX[i]} and is not a yolosafe worker: stop it (kill $pid), or let fix_gpu_memory.sh do it")
            fi
        done
        if [[ ${GPU_USED[i]} =~ ^[0-9]+$ ]] && ((GPU_USED[i] > BUSY_MIB)) && ! gpu_lists_processes "${GPU_IDX[i]}"; then
            echo "    no process listed for ${GPU_USED[i]} MiB used: NVML cannot always see pids inside containers"
            unseen=1
        fi
        if ((others > BUSY_MIB)); then
            busy+="${GPU_IDX[i]},"
        else
            idle+="${GPU_IDX[i]},"
        fi
    done
    if ((unseen)); then
        note="some GPU memory belongs to processes not visible here"
        if in_container; then
            note+=" (this looks like a container: look on the host with nvidia-smi)"
        fi
        echo "note: $note"
        VERDICT+=("$note")
    fi
    if [[ -n $busy ]]; then
        text="--gpus ${idle%,}"
        [[ -n $idle ]] || text="another machine"
        VERDICT+=("GPU(s) ${busy%,} hold more than $BUSY_MIB MiB of other processes: stop them, or train without\
 those GPUs ($text)")
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi:"
        nvidia-smi 2>&1 | sed 's/^/    /' || true
    else
        echo "nvidia-smi: not installed here"
    fi
}

environment_section() {
    local status name value var stray=""
    section "environment"
    # ALLOC_MERGED: the user's allocator settings with expandable_segments:True, for fix_gpu_memory.sh
    ALLOC_EXPANDABLE="unset" ALLOC_MERGED=""
    for name in PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF; do
        printf '%-24s %s\n' "$name" "${!name-(unset)}"
    done
    if [[ -n $PY ]]; then
        # shellcheck disable=SC2034  # ALLOC_MERGED is used by fix_gpu_memory.sh
        while IFS=$'\t' read -r status name value; do
            case $status in
                note) echo "    note: $value"
                      VERDICT+=("$name: $value") ;;
                invalid) echo "    INVALID: $value"
                         ALLOC_EXPANDABLE="unknown (invalid settings)"
                         VERDICT+=("$value (torch and yolosafe train refuse it)") ;;
                expandable) if [[ $ALLOC_EXPANDABLE != unknown* ]]; then ALLOC_EXPANDABLE=$name; fi ;;
                merged) ALLOC_MERGED=$name ;;
            esac
        done < <(ys_py alloc || true)
    fi
    if [[ $ALLOC_EXPANDABLE == True ]]; then
        echo "expandable_segments: on"
    elif [[ $ALLOC_EXPANDABLE == unknown* ]]; then
        echo "expandable_segments: unknown (the settings above are invalid)"
    else
        echo "expandable_segments: off in this shell (${ALLOC_EXPANDABLE}); yolosafe train turns it on for its own" \
            "workers, but your other scripts and notebooks run without it"
        VERDICT+=("expandable_segments is off in this shell: yolosafe train sets it for its workers, your own\
 scripts and notebooks do not get it; fix_gpu_memory.sh can add it to your shell rc file")
    fi
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES} (torch sees only these GPUs, renumbered from 0;" \
            "NVML, nvidia-smi and yolosafe gpus ignore it and show every GPU)"
    else
        echo "CUDA_VISIBLE_DEVICES (unset): every GPU visible"
    fi
    for var in RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE; do
        if [[ -n ${!var+set} ]]; then
            stray+="$var=${!var} "
        fi
    done
    if [[ -n $stray ]]; then
        echo "stray DDP variables: ${stray% } (a script started from this shell thinks it is a DDP rank;" \
            "yolosafe train removes them for its worker)"
        VERDICT+=("stray DDP variables in this shell (${stray% }): unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE")
    else
        echo "RANK/LOCAL_RANK/WORLD_SIZE: none set"
    fi
}

# memory_summary RUN_DIR: show memory_summary.json (NVML peaks per GPU and phase). Without one, build it with
# `yolosafe report` in a scratch directory of links to the run's files: the run directory itself is never written.
# Sets SUMMARY_FILE for the verdict.
memory_summary() {
    local run=$1 tmp f err
    SUMMARY_FILE=""
    if [[ -f $run/memory_summary.json ]]; then
        SUMMARY_FILE=$run/memory_summary.json
        echo "memory peaks (memory_summary.json: NVML samples joined with the phases; epochs 0-based):"
        ys_py summary "$SUMMARY_FILE" || true
        return
    fi
    if [[ ! -f $run/memory.csv ]]; then
        echo "memory peaks: none (no memory.csv nor memory_summary.json: an older run, or the memory watch was off)"
        return
    fi
    if ! yolosafe report --help >/dev/null 2>&1; then
        echo "memory peaks: memory.csv is there but no memory_summary.json, and this yolosafe has no report command"
        return
    fi
    tmp=$(mktemp -d)
    for f in "$run"/yolosafe.json "$run"/events.jsonl "$run"/memory.csv "$run"/failure-*-rank*.json; do
        if [[ -e $f ]]; then
            ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$tmp/"
        fi
    done
    if err=$(yolosafe report "$tmp" 2>&1 >/dev/null) && [[ -f $tmp/memory_summary.json ]]; then
        SUMMARY_COPY=$(mktemp)
        cp "$tmp/memory_summary.json" "$SUMMARY_COPY"
        SUMMARY_FILE=$SUMMARY_COPY
        echo "memory peaks (computed by yolosafe report from memory.csv; the run directory is left as it is):"
        ys_py summary "$SUMMARY_FILE" || true
    else
        err=${err##*$'\n'}
        echo "memory peaks: yolosafe report failed: ${err//"$tmp"/$run}"
    fi
    rm -rf "$tmp"
}

run_section() {
    local run=$1 line
    if [[ -z $run ]]; then
        section "last run"
        echo "no yolosafe run found (no yolosafe.json under ./runs); pass a run directory: $0 RUN_DIR"
        return
    fi
    section "last run: $run"
    if [[ -z $PY ]]; then
        echo "python3 not found: cannot read yolosafe.json"
        return
    fi
    ys_py run "$run" || echo "(could not read the run: see above)"
    memory_summary "$run"
    while IFS= read -r line; do
        if [[ -n $line ]]; then RUN_VERDICT+=("$line"); fi
    done < <(ys_py verdict "$run" "${SUMMARY_FILE:-}" || true)
}

verdict_section() {
    local item
    section "verdict"
    if ((${#VERDICT[@]} + ${#RUN_VERDICT[@]} == 0)); then
        echo "- nothing obviously wrong"
    fi
    for item in "${RUN_VERDICT[@]+"${RUN_VERDICT[@]}"}" "${VERDICT[@]+"${VERDICT[@]}"}"; do
        echo "- $item"
    done
    echo "- to repair step by step (asks before each change): bash scripts/fix_gpu_memory.sh [--config YOUR.yaml]"
}

cleanup() {
    if [[ -n ${SUMMARY_COPY:-} ]]; then
        rm -f "$SUMMARY_COPY"
    fi
}

main() {
    local run=""
    case ${1-} in
        -h | --help) usage; return 0 ;;
        -*) echo "diagnose_gpu_memory.sh: unknown option $1 (usage: diagnose_gpu_memory.sh [RUN_DIR])" >&2
            return 2 ;;
    esac
    if (($# > 1)); then
        echo "diagnose_gpu_memory.sh: one RUN_DIR at most (usage: diagnose_gpu_memory.sh [RUN_DIR])" >&2
        return 2
    fi
    if (($# == 1)); then
        if [[ ! -f $1/yolosafe.json ]]; then
            echo "diagnose_gpu_memory.sh: $1: not a yolosafe run directory (no yolosafe.json)" >&2
            return 2
        fi
        run=${1%/}
    fi
    find_python
    SUMMARY_COPY=""
    trap cleanup EXIT
    echo "GPU memory diagnosis, $(date '+%Y-%m-%d %H:%M:%S') on $(hostname 2>/dev/null || echo '?')"
    machine_section
    environment_section
    if [[ -z $run && -d runs && -n $PY ]]; then
        run=$(ys_py find-run runs || true)
    fi
    run_section "$run"
    verdict_section
    return 0
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
