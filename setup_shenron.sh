#!/usr/bin/env bash
# Create (or reuse) the toolkit's virtual environment and install requirements.txt into it.
# Idempotent: the hash of requirements.txt is stored in the venv; a second run with nothing changed
# only prints the versions. Venv location: $CELLMAP_VENV, else .venv in the repository.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${CELLMAP_VENV:-$repo/.venv}"
python_bin="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$repo/requirements.txt" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "setup: $venv is up to date with requirements.txt (nothing to do)"
else
    if ! "$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
        echo "setup: $python_bin is older than Python 3.10; set PYTHON=/path/to/python3.11" >&2
        exit 2
    fi
    [[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
    # Some pip configurations list local index folders that may not exist on a given machine; pip then
    # prints one harmless "Location ... is ignored" line per package, which hides real errors.
    quiet_pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
    quiet_pip install --quiet --upgrade pip
    echo "setup: installing requirements into $venv (torch is several GB; first run takes minutes)"
    quiet_pip install --quiet -r "$repo/requirements.txt"
    echo "$want" > "$stamp"
fi

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
pkgs = ["torch", "torchvision", "cellmap-data", "zarr", "numpy", "matplotlib", "tqdm", "tensorboard", "monai"]
print("setup: " + ", ".join(f"{p} {md.version(p)}" for p in pkgs))
if torch.cuda.is_available():
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"setup: CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}")
else:
    print("setup: no CUDA GPU visible; training runs on the CPU (gloo for DDP)")
PY
