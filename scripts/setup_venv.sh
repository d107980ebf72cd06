#!/usr/bin/env bash
# Creates the project's virtual environment.
#   setup_venv.sh [VENV]            exact versions from requirements/constraints.txt (what `make test` passed with)
#   setup_venv.sh --latest [VENV]   the newest release of every dependency instead (`make test-latest`)
# torch is installed first on its own: where a CPU build of torch 2.13.0 lies on local disk (pip's find-links; the
# project's dev machines and CI) it is taken from there in seconds, elsewhere pip resolves it from the index.
# Installing it before the package keeps pip from pulling a multi-GB CUDA build to satisfy the loose requirement.
# With --latest, torch stays that local build where there is one: the newest torch on the index is a CUDA build of
# several GB, and what --latest is for is catching the releases of the libraries we build on (transformers first).
set -euo pipefail
latest=0
if [ "${1:-}" = "--latest" ]; then
    latest=1
    shift
fi
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
constraints="$here/requirements/constraints.txt"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if "$pip" install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
        "$pip" install -q torch==2.13.0
    elif [ "$latest" = 1 ]; then
        "$pip" install -q "torch>=2.4"
    else
        "$pip" install -q -c "$constraints" torch
    fi
fi
if [ "$latest" = 1 ]; then
    # everything at its newest but torch, which stays the build installed above
    keep=$(mktemp)
    "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$keep"
    "$pip" install -q --upgrade --upgrade-strategy eager -c "$keep" -e "$here[dev]"
    rm -f "$keep"
else
    "$pip" install -q -c "$constraints" -e "$here[dev]"
fi
"$venv/bin/python" -m pip freeze --exclude-editable > "$venv/.freeze"
