#!/usr/bin/env bash
# Launcher for the CellMap organelle-segmentation toolkit. `./run.sh help` lists the commands.
# Training runs torchrun over the visible GPUs (one node: --standalone; several: c10d rendezvous) or one CPU
# process. Paths on the command line are taken relative to the directory run.sh is called from; python
# runs in the repository. Options are checked (sweep.py check, no torch) before anything heavy starts.
set -euo pipefail
caller_dir="$PWD"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# PATH made absolute against the caller's directory (not required to exist; links are kept).
abs_path() {
    local p="$1"
    [[ "$p" == "~"* ]] && p="$HOME${p:1}"
    [[ "$p" == /* ]] || p="$caller_dir/$p"
    realpath -m -s -- "$p"
}

venv="$(abs_path "${CELLMAP_VENV:-$repo/.venv}")"
py="$venv/bin/python"
runs_dir="$(abs_path "${CELLMAP_RUNS_DIR:-$repo/runs}")"
export CELLMAP_VENV="$venv"
# Folders given by environment variables are taken from the caller's directory too.
for var in CELLMAP_DATA_ROOT CELLMAP_CACHE_DIR; do
    if [[ -n "${!var:-}" ]]; then export "$var=$(abs_path "${!var}")"; fi
done
cd "$repo"

usage() {
    cat <<'TXT'
usage: ./run.sh COMMAND [ARGS] [run.sh options] [train_local.py options]

  setup                       create/update the virtual environment (.venv or $CELLMAP_VENV)
  test                        environment check (test_setup.py) and the test suite
  quick [model] [loss]        short smoke run of the whole pipeline (default unet_2d per_class_weighted)
  single LOSS [model]         one run with the named loss (mode loss_comparison)
  compare [model]             every named loss (or --losses a,b) on one model: a sweep, then the ranking report
  compare-models [loss]       2D then 2.5D UNet with identical settings and seeds: a sweep, then the table
  full [model] [loss]         long run (mode full)
  train [options]             one train_local.py run with these options, on all GPUs (torchrun) or the CPU
  resume RUN_DIR [options]    continue a run from its last completed epoch
  sweep GROUP [--arm K|--index I]   continue a sweep: skip completed runs, resume partial ones, start the
                              missing ones, then the report (all of them, or one arm / one run of it)
  status GROUP                every run of a sweep: completed, running (epochs done), failed, missing
  report RUN_DIR...           tables and plots for run folders or a group (visualize_results.py)
  evaluate RUN_DIR [options]  a checkpoint on the validation crops: 8-nm metrics, --official score, --tta,
                              --orthoplane (evaluate.py --help)
  submit RUN_DIR [--manifest CSV] [--data-root DIR]
                              predict the test crops and write submission.zarr + .zip (submit.py --help)
  tensorboard [DIR]           start TensorBoard on the runs folder
  help                        this text

run.sh options:
  --gpus N            processes per node (default: the visible GPUs; none: one CPU process)
  --seeds K           K seeds per arm; with --seed N the seeds are N..N+K-1 (default N = 0)
  --seed N            the seed (single runs) or the first seed (sweeps)
  --group DIR         the sweep folder: created, or continued when it holds the same plan
  --out-dir DIR       where new folders go: a single run's folder, or a sweep's group folder (default runs/)
  --losses A,B        the losses of `compare` (default: every named loss)
  --plan-only         write the sweep file and stop (e.g. before `sbatch --array` over its runs)
  --nodes N --node-rank R --master HOST:PORT
                      multi-node DDP: torchrun c10d rendezvous at HOST:PORT (default node rank
                      $SLURM_NODEID; default master: the first host of $SLURM_JOB_NODELIST, port 29400 +
                      job id % 1000)
Every other --option goes to train_local.py (e.g. --data-root DIR, --classes all, --epochs 5, --lr 3e-4).
A sweep (compare, compare-models, or any training command with --seeds K > 1 or --group) is resumable:
run the same command with --group DIR, or ./run.sh sweep DIR, to continue it.
Models: unet_2d, unet_25d, unet_3d. Losses: python losses.py lists them.
TXT
}

# Print one `error:` line and exit with status 2 (bad input).
die() { echo "error: $*" >&2; exit 2; }

# Create or update the virtual environment when it is missing or older than requirements.txt.
ensure_venv() {
    if [[ ! -x "$py" || ! -f "$venv/.requirements.sha256" ]] || \
       [[ "$(cat "$venv/.requirements.sha256")" != "$(sha256sum requirements.txt | cut -d' ' -f1)" ]]; then
        "$repo/setup_shenron.sh"
    fi
}

# Visible GPUs without importing torch: the entries of CUDA_VISIBLE_DEVICES when it is set (what CUDA
# would see; at most what nvidia-smi lists), else the GPUs nvidia-smi -L lists, else 0.
gpu_count() {
    local smi="" list n
    if command -v nvidia-smi >/dev/null 2>&1; then
        smi="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        list="${CUDA_VISIBLE_DEVICES// /}"
        if [[ -z "$list" || "$list" == -* ]]; then echo 0; return; fi
        n="$(tr ',' '\n' <<< "$list" | grep -c .)"
        if [[ -n "$smi" ]] && (( smi < n )); then n="$smi"; fi
        echo "$n"
        return
    fi
    echo "${smi:-0}"
}

# Whether HOST is a loopback address (the nodes of a test on one machine).
is_loopback() { [[ "$1" == 127.* || "$1" == localhost || "$1" == "::1" ]]; }

# Run a command in the background and wait for it; SIGTERM, SIGINT and SIGUSR1 reaching run.sh are passed
# on to it as SIGTERM (train_local.py records the stop after its last completed epoch, sweep.py stops after
# the current run), and run.sh stops after it. Returns the command's exit status.
forward_signals() {
    local child rc
    "$@" &
    child=$!
    trap 'STOPPED=1; kill -TERM "$child" 2>/dev/null || true' TERM INT USR1
    while :; do
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break  # still alive: wait was cut short by a trapped signal
    done
    trap - TERM INT USR1
    return "$rc"
}

# Check train_local.py options quickly (no torch); fills the array `checked` with them in canonical form
# and absolute paths, and prints the paths. Exits 2 with sweep.py's one-line error on bad input.
check_options() {
    local out rc=0
    out="$(mktemp)"
    "$py" sweep.py check --cwd "$caller_dir" -- "$@" > "$out" || rc=$?
    if (( rc )); then rm -f "$out"; exit "$rc"; fi
    checked=()
    local part
    while IFS= read -r -d '' part; do checked+=("$part"); done < "$out"
    rm -f "$out"
}

# One train_local.py run with already checked ARGS: torchrun over GPUS processes per node (several nodes:
# c10d rendezvous at MASTER), or one plain process when no GPU is visible on a single node.
launch() {
    local n="${GPUS:-}" run_name id
    [[ -n "$n" ]] || n="$(gpu_count)"
    if (( NODES > 1 )); then
        (( n > 0 )) || n=1
        run_name="$(arg_value --run-name "$@")"
        id="${CELLMAP_RDZV_ID:-${SLURM_JOB_ID:-cellmap}}-${run_name:-run}"
        local cmd=("$venv/bin/torchrun" --nnodes "$NODES" --node-rank "$NODE_RANK" --nproc-per-node "$n"
                   --rdzv-backend c10d --rdzv-endpoint "$MASTER" --rdzv-id "$id")
        if is_loopback "${MASTER%:*}"; then cmd+=(--local-addr "${MASTER%:*}"); fi
        echo "run.sh: node $NODE_RANK of $NODES, $n process(es) here, c10d rendezvous at $MASTER (id $id)"
        forward_signals "${cmd[@]}" train_local.py "$@"
    elif (( n > 0 )); then
        forward_signals "$venv/bin/torchrun" --standalone --nproc-per-node "$n" train_local.py "$@"
    else
        forward_signals "$py" train_local.py "$@"
    fi
}

# The value following FLAG in the remaining arguments (empty when absent).
arg_value() {
    local flag="$1" value=""
    shift
    while (( $# > 1 )); do
        if [[ "$1" == "$flag" ]]; then value="$2"; fi
        shift
    done
    echo "$value"
}

# Check the run.sh options that take numbers and the multi-node settings; fill in the SLURM defaults.
check_launch_options() {
    [[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus $GPUS must be a whole number (0: CPU)"
    [[ -z "$SEEDS" || "$SEEDS" =~ ^[1-9][0-9]*$ ]] || die "--seeds $SEEDS must be a positive integer"
    [[ -z "$SEED" || "$SEED" =~ ^[0-9]+$ ]] || die "--seed $SEED must be a whole number >= 0"
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes $NODES must be a positive integer"
    if (( NODES == 1 )); then
        [[ -z "$NODE_RANK" || "$NODE_RANK" == 0 ]] || die "--node-rank $NODE_RANK needs --nodes > 1"
        NODE_RANK=0
        return
    fi
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
    [[ -n "$NODE_RANK" ]] || die "--nodes $NODES needs --node-rank R (0..$((NODES - 1)); under srun: \$SLURM_NODEID)"
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NODES )) || die "--node-rank $NODE_RANK must be in 0..$((NODES - 1))"
    if [[ -z "$MASTER" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
        command -v scontrol >/dev/null || die "--nodes $NODES without --master: scontrol is needed to read \$SLURM_JOB_NODELIST"
        MASTER="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):$(( 29400 + ${SLURM_JOB_ID:-0} % 1000 ))"
    fi
    [[ -n "$MASTER" ]] || die "--nodes $NODES needs --master HOST:PORT (the rendezvous host, reachable from every node)"
    [[ "$MASTER" =~ ^[^:]+:[0-9]+$ ]] || die "--master $MASTER must be HOST:PORT, e.g. node01:29400"
}

# Positional argument I, or DEFAULT.
arg() { local i="$1" default="$2"; if (( ${#positional[@]} > i )); then echo "${positional[$i]}"; else echo "$default"; fi; }

# Refuse more than N positional arguments for the command.
at_most() { (( ${#positional[@]} <= $1 )) || die "$cmd takes at most $1 argument(s), got: ${positional[*]} (options start with --)"; }

# Train the sweep in GROUP (all runs, or SELECT), then its report; exits with the sweep's status.
run_sweep() {
    local group="$1" rc=0
    shift
    local launcher=("$repo/run.sh" train --nodes "$NODES" --node-rank "$NODE_RANK")
    [[ -z "$GPUS" ]] || launcher+=(--gpus "$GPUS")
    [[ -z "$MASTER" ]] || launcher+=(--master "$MASTER")
    forward_signals "$py" sweep.py run "$group" "$@" --node-rank "$NODE_RANK" -- "${launcher[@]}" || rc=$?
    if (( rc == 0 )); then echo "run.sh: sweep $group complete; report: $group/report"; fi
    (( rc == 0 || STOPPED )) || echo "run.sh: sweep $group not complete; rerun the same command, or ./run.sh sweep $group, to continue" >&2
    exit "$rc"
}

# A training command: one run (quick/single/full/train) or a sweep (compare, compare-models, --seeds, --group).
training_command() {
    local models loss mode losses="" ranking=() group sweep=0 label
    case "$cmd" in
        quick) at_most 2; models="$(arg 0 unet_2d)"; loss="$(arg 1 per_class_weighted)"; mode=quick ;;
        single) at_most 2; (( ${#positional[@]} >= 1 )) || die "single needs a LOSS (python losses.py lists them)"
                loss="$(arg 0 '')"; models="$(arg 1 unet_2d)"; mode=loss_comparison ;;
        full) at_most 2; models="$(arg 0 unet_25d)"; loss="$(arg 1 per_class_weighted)"; mode=full ;;
        compare) at_most 1; models="$(arg 0 unet_2d)"; loss=""; losses="${LOSSES:-all}"; mode=loss_comparison
                 ranking=(--ranking); sweep=1 ;;
        compare-models) at_most 1; models="unet_2d,unet_25d"; loss="$(arg 0 per_class_weighted)"
                        mode=model_comparison; sweep=1 ;;
    esac
    [[ -z "$LOSSES" || "$cmd" == compare ]] || die "--losses is for compare; $cmd trains one loss"
    if [[ -n "$SEEDS" && "$SEEDS" != 1 ]] || [[ -n "$GROUP" || "$PLAN_ONLY" == 1 ]]; then sweep=1; fi
    if (( ! sweep )); then
        local defaults=(--model "$models" --loss "$loss" --mode "$mode" --out-dir "${OUT_DIR:-$runs_dir}")
        # A resume takes the stored run's settings: only the user's options go with it.
        if [[ " ${extra[*]-} " == *" --resume "* ]]; then defaults=(); fi
        [[ -z "$SEED" ]] || defaults+=(--seed "$SEED")
        check_options ${defaults[@]+"${defaults[@]}"} ${extra[@]+"${extra[@]}"}
        launch "${checked[@]}"
        exit $?
    fi
    check_options ${extra[@]+"${extra[@]}"}
    local user=(${checked[@]+"${checked[@]}"})
    label="$cmd"
    group="${GROUP:+$(abs_path "$GROUP")}"
    if [[ -z "$group" ]]; then
        (( NODES == 1 )) || die "a sweep on $NODES nodes needs --group DIR (the same folder on every node)"
        case "$cmd" in
            compare) group="compare-$models" ;;
            compare-models) group="compare-models" ;;
            *) group="$cmd-${models//,/+}-$loss" ;;
        esac
        group="$(abs_path "${OUT_DIR:-$runs_dir}")/$group-$(date +%Y%m%d-%H%M%S)"
    elif [[ -n "$OUT_DIR" ]]; then
        die "--group $GROUP and --out-dir $OUT_DIR both name where the sweep goes; give one"
    fi
    echo "run.sh: group folder $group"
    "$py" sweep.py plan "$group" --command "$label" --models "$models" --losses "${losses:-$loss}" --mode "$mode" \
        --seeds "${SEEDS:-1}" --seed "${SEED:-0}" --node-rank "$NODE_RANK" --cwd "$caller_dir" \
        ${ranking[@]+"${ranking[@]}"} -- ${user[@]+"${user[@]}"}
    if (( PLAN_ONLY )); then
        local count
        count="$("$py" sweep.py status "$group" --count runs)"
        echo "run.sh: planned only; train it with ./run.sh sweep $group, or one SLURM array task per run:" \
             "sbatch --array=0-$(( count - 1 )) slurm/sweep_array.sbatch $group"
        exit 0
    fi
    run_sweep "$group"
}

# The report command: visualize_results.py over run folders (paths from the caller's directory).
report_command() {
    local dirs=() flags=() out=""
    while (( $# )); do
        case "$1" in
            --out) (( $# > 1 )) || die "--out needs a folder"; out="$(abs_path "$2")"; shift 2 ;;
            --out=*) out="$(abs_path "${1#*=}")"; shift ;;
            --panel-classes|--checkpoint) (( $# > 1 )) || die "$1 needs a value"; flags+=("$1" "$2"); shift 2 ;;
            --*) flags+=("$1"); shift ;;
            *) dirs+=("$(abs_path "$1")"); shift ;;
        esac
    done
    (( ${#dirs[@]} >= 1 )) || die "report needs one or more run folders (or a group folder)"
    [[ -n "$out" ]] && flags+=(--out "$out")   # else visualize_results.py names the folder after the runs
    echo "run.sh: report on ${dirs[*]}"
    "$py" visualize_results.py "${dirs[@]}" ${flags[@]+"${flags[@]}"}
}

# A script over one run folder (evaluate.py, submit.py) with its path options taken from the caller's directory.
run_folder_command() {
    local script="$1"; shift
    local args=() run=""
    while (( $# )); do
        case "$1" in
            --manifest|--data-root|--datasplit|--out)
                (( $# > 1 )) || die "$1 needs a value"; args+=("$1" "$(abs_path "$2")"); shift 2 ;;
            --*) args+=("$1"); if (( $# > 1 )) && [[ "$2" != --* ]]; then args+=("$2"); shift; fi; shift ;;
            *) [[ -z "$run" ]] || die "$script takes one run folder (got $run and $1)"; run="$(abs_path "$1")"; shift ;;
        esac
    done
    [[ -n "$run" ]] || die "${script%.py} needs a run folder, e.g. ./run.sh ${script%.py} runs/<run_name>"
    echo "run.sh: ${script%.py} $run"
    "$py" "$script" "$run" ${args[@]+"${args[@]}"}
}

cmd="${1:-help}"; shift || true
case "$cmd" in
    help|-h|--help) usage; exit 0 ;;
    setup) "$repo/setup_shenron.sh"; exit 0 ;;
    test) ensure_venv; "$py" test_setup.py; "$py" -m pytest tests -q "$@"; exit 0 ;;
    report) ensure_venv; report_command "$@"; exit 0 ;;
    evaluate) ensure_venv; run_folder_command evaluate.py "$@"; exit 0 ;;
    submit) ensure_venv; run_folder_command submit.py "$@"; exit 0 ;;
    tensorboard)
        ensure_venv
        logdir="$runs_dir"
        if (( $# )) && [[ "$1" != --* ]]; then logdir="$(abs_path "$1")"; shift; fi
        "$venv/bin/tensorboard" --logdir "$logdir" "$@"
        exit 0 ;;
esac

positional=(); extra=(); GPUS=""; SEEDS=""; SEED=""; GROUP=""; OUT_DIR=""; LOSSES=""; PLAN_ONLY=0
NODES=1; NODE_RANK=""; MASTER=""; SELECT=(); STOPPED=0
while (( $# )); do
    case "$1" in
        --gpus|--seeds|--seed|--group|--out-dir|--losses|--nodes|--node-rank|--master|--arm|--index)
            (( $# > 1 )) || die "$1 needs a value"
            case "$1" in
                --gpus) GPUS="$2" ;; --seeds) SEEDS="$2" ;; --seed) SEED="$2" ;; --group) GROUP="$2" ;;
                --out-dir) OUT_DIR="$(abs_path "$2")" ;; --losses) LOSSES="$2" ;; --nodes) NODES="$2" ;;
                --node-rank) NODE_RANK="$2" ;; --master) MASTER="$2" ;; --arm|--index) SELECT+=("$1" "$2") ;;
            esac
            shift 2 ;;
        --plan-only) PLAN_ONLY=1; shift ;;
        --) shift; extra+=("$@"); break ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --*) extra+=("$1"); if (( $# > 1 )) && [[ "$2" != --* ]]; then extra+=("$2"); shift; fi; shift ;;
        *) positional+=("$1"); shift ;;
    esac
done
check_launch_options
[[ ${#SELECT[@]} == 0 || "$cmd" == sweep ]] || die "${SELECT[0]} is for ./run.sh sweep GROUP"
case "$cmd" in
    train|resume|sweep|status)
        for given in "--group:$GROUP" "--seeds:$SEEDS" "--losses:$LOSSES" "--plan-only:${PLAN_ONLY/0/}"; do
            [[ -z "${given#*:}" ]] || die "${given%%:*} is for the training commands quick, single, full, compare, compare-models, not $cmd"
        done ;;
esac

case "$cmd" in
    quick|single|full|compare|compare-models) ensure_venv; training_command ;;
    train)
        ensure_venv
        (( ${#positional[@]} == 0 )) || die "train takes only --options (got ${positional[*]})"
        [[ -z "$SEED" ]] || extra+=(--seed "$SEED")
        [[ -z "$OUT_DIR" ]] || extra+=(--out-dir "$OUT_DIR")
        check_options ${extra[@]+"${extra[@]}"}
        launch ${checked[@]+"${checked[@]}"}
        ;;
    resume)
        ensure_venv
        (( ${#positional[@]} == 1 )) || die "resume needs one RUN_DIR (a run folder with results.json)"
        [[ -z "$SEED" ]] || extra+=(--seed "$SEED")
        [[ -z "$OUT_DIR" ]] || extra+=(--out-dir "$OUT_DIR")
        check_options --resume "${positional[0]}" ${extra[@]+"${extra[@]}"}
        launch "${checked[@]}"
        ;;
    sweep|status)
        ensure_venv
        (( ${#positional[@]} == 1 )) || die "$cmd needs one GROUP folder (with sweep.json)"
        group="$(abs_path "${positional[0]}")"
        (( ${#extra[@]} == 0 )) || die "$cmd takes no train_local.py options (the sweep file holds them): ${extra[*]}"
        if [[ "$cmd" == status ]]; then exec "$py" sweep.py status "$group"; fi
        "$py" sweep.py status "$group" --count runs > /dev/null  # one-line error when it is not a sweep
        run_sweep "$group" ${SELECT[@]+"${SELECT[@]}"}
        ;;
    *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
