#!/usr/bin/env bash
# Launcher for the CellMap organelle-segmentation toolkit. `./run.sh help` lists the commands.
# Training commands run `torchrun --nproc_per_node=<visible GPUs>` (DDP, NCCL) or one CPU process.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
venv="${CELLMAP_VENV:-$repo/.venv}"
py="$venv/bin/python"
runs_dir="${CELLMAP_RUNS_DIR:-$repo/runs}"

usage() {
    cat <<'TXT'
usage: ./run.sh COMMAND [ARGS] [--gpus N] [--seeds N] [-- extra train_local.py options]

  setup                       create/update the virtual environment (.venv or $CELLMAP_VENV)
  test                        environment check (test_setup.py) and the test suite
  quick [model] [loss]        short smoke run of the whole pipeline (default unet_2d per_class_weighted)
  single LOSS [model]         one run with the named loss (mode loss_comparison)
  compare [model]             every named loss on one model, then the ranking report
  compare-models [loss]       2D then 2.5D UNet with identical settings and seed, then the comparison table
  full [model] [loss]         long run (mode full)
  report RUN_DIR...           tables and plots for any set of run folders (visualize_results.py)
  tensorboard [DIR]           start TensorBoard on the runs folder
  help                        this text

Options: --gpus N uses N GPUs (default: all visible); --seeds N repeats each arm of compare /
compare-models with seeds 0..N-1 and reports mean and spread. Any other --option is passed to
train_local.py (e.g. --data-root DIR, --classes all, --epochs 5, --batch-size 8, --lr 3e-4).
Models: unet_2d, unet_25d, unet_3d. Losses: python losses.py lists them.
TXT
}

ensure_venv() {
    if [[ ! -x "$py" || ! -f "$venv/.requirements.sha256" ]] || \
       [[ "$(cat "$venv/.requirements.sha256")" != "$(sha256sum requirements.txt | cut -d' ' -f1)" ]]; then
        "$repo/setup_shenron.sh"
    fi
}

gpu_count() {
    if [[ -n "${GPUS:-}" ]]; then echo "$GPUS"; return; fi
    "$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# Train once with the given train_local.py arguments, on all GPUs or one CPU process.
train() {
    local n; n="$(gpu_count)"
    if (( n > 0 )); then
        "$venv/bin/torchrun" --standalone --nproc_per_node="$n" train_local.py "$@"
    else
        "$py" train_local.py "$@"
    fi
}

cmd="${1:-help}"; shift || true
positional=(); extra=(); GPUS=""; SEEDS=1
while (( $# )); do
    case "$1" in
        --gpus) GPUS="$2"; shift 2 ;;
        --seeds) SEEDS="$2"; shift 2 ;;
        --) shift; extra+=("$@"); break ;;
        --*=*) extra+=("$1"); shift ;;
        --*) extra+=("$1"); if (( $# > 1 )) && [[ "$2" != --* ]]; then extra+=("$2"); shift; fi; shift ;;
        *) positional+=("$1"); shift ;;
    esac
done
if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then echo "error: --seeds $SEEDS must be a positive integer" >&2; exit 2; fi
arg() { local i="$1" default="$2"; if (( ${#positional[@]} > i )); then echo "${positional[$i]}"; else echo "$default"; fi; }

# Run one arm (model, loss) for every seed into a group folder; prints nothing else.
run_arm() {
    local group="$1" model="$2" loss="$3" mode="$4" seed
    for (( seed = 0; seed < SEEDS; seed++ )); do
        train --model "$model" --loss "$loss" --mode "$mode" --seed "$seed" --out-dir "$group" \
              --run-name "$model-$loss-s$seed" ${extra[@]+"${extra[@]}"}
    done
}

case "$cmd" in
    help|-h|--help) usage ;;
    setup) "$repo/setup_shenron.sh" ;;
    test)
        ensure_venv
        "$py" test_setup.py
        "$py" -m pytest tests -q ${extra[@]+"${extra[@]}"}
        ;;
    quick)
        ensure_venv
        train --model "$(arg 0 unet_2d)" --loss "$(arg 1 per_class_weighted)" --mode quick \
              --out-dir "$runs_dir" ${extra[@]+"${extra[@]}"}
        ;;
    single)
        ensure_venv
        (( ${#positional[@]} >= 1 )) || { echo "error: single needs a LOSS (python losses.py lists them)" >&2; exit 2; }
        train --loss "$(arg 0 '')" --model "$(arg 1 unet_2d)" --mode loss_comparison \
              --out-dir "$runs_dir" ${extra[@]+"${extra[@]}"}
        ;;
    full)
        ensure_venv
        train --model "$(arg 0 unet_25d)" --loss "$(arg 1 per_class_weighted)" --mode full \
              --out-dir "$runs_dir" ${extra[@]+"${extra[@]}"}
        ;;
    compare)
        ensure_venv
        model="$(arg 0 unet_2d)"
        group="$runs_dir/compare-$model-$(date +%Y%m%d-%H%M%S)"
        for loss in $("$py" losses.py --names); do
            run_arm "$group" "$model" "$loss" loss_comparison
        done
        "$py" visualize_results.py "$group"/*/ --out "$group/report" --ranking
        ;;
    compare-models)
        ensure_venv
        loss="$(arg 0 per_class_weighted)"
        group="$runs_dir/compare-models-$(date +%Y%m%d-%H%M%S)"
        for model in unet_2d unet_25d; do
            run_arm "$group" "$model" "$loss" model_comparison
        done
        "$py" visualize_results.py "$group"/*/ --out "$group/report"
        ;;
    report)
        ensure_venv
        (( ${#positional[@]} >= 1 )) || { echo "error: report needs one or more run folders" >&2; exit 2; }
        "$py" visualize_results.py "${positional[@]}" ${extra[@]+"${extra[@]}"}
        ;;
    tensorboard)
        ensure_venv
        "$venv/bin/tensorboard" --logdir "$(arg 0 "$runs_dir")" ${extra[@]+"${extra[@]}"}
        ;;
    *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
