#!/usr/bin/env bash
# Preemption and time-limit handling shared by the sbatch templates (they source this file).
#
# run_requeueable CMD...  runs CMD in the background and waits for it. On SIGUSR1 (the time limit is near:
# `#SBATCH --signal=B:USR1@120` sends it to this batch shell 120 s before) or SIGTERM (preemption), it passes
# SIGTERM on to CMD (run.sh hands it to torchrun, whose workers record the stop after their last completed
# epoch; last.pt holds that epoch), waits until CMD has exited, then requeues the job with
# `scontrol requeue $SLURM_JOB_ID`. The requeued job runs the same script with the same arguments on the same
# group folder: completed runs are skipped and the interrupted one resumes from its last.pt.
# Without a signal it returns CMD's exit status.

# Run CMD..., forwarding a stop signal as SIGTERM and requeueing the job after CMD has saved and exited.
run_requeueable() {
    local child rc
    CELLMAP_STOP_SIGNAL=""
    "$@" &
    child=$!
    trap 'CELLMAP_STOP_SIGNAL=USR1; kill -TERM "$child" 2>/dev/null || true' USR1
    trap 'CELLMAP_STOP_SIGNAL=TERM; kill -TERM "$child" 2>/dev/null || true' TERM
    while :; do
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break  # still running: wait was cut short by a trapped signal
    done
    trap - USR1 TERM
    if [[ -z "$CELLMAP_STOP_SIGNAL" ]]; then
        return "$rc"
    fi
    echo "slurm: SIG$CELLMAP_STOP_SIGNAL: training stopped after saving (exit $rc); requeueing job ${SLURM_JOB_ID:-?}"
    if scontrol requeue "${SLURM_JOB_ID:?}"; then
        return 0
    fi
    echo "slurm: scontrol requeue ${SLURM_JOB_ID} was refused (job cancelled, or not requeueable: #SBATCH --requeue);" \
         "submit the same script again to continue" >&2
    return 1
}

# The repository: $CELLMAP_REPO, else the submission directory (sbatch runs a copy of the script elsewhere).
cellmap_repo() {
    local repo="${CELLMAP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    if [[ ! -x "$repo/run.sh" ]]; then
        echo "error: no run.sh in $repo; submit from the repository or set CELLMAP_REPO=/path/to/repo" >&2
        exit 2
    fi
    echo "$repo"
}
