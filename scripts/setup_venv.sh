#!/usr/bin/env bash
# Creates the project's virtual environment. torch is installed first on its own: where a CPU build of
# torch 2.13.0 lies on local disk (pip's find-links; the project's dev machines) it is taken from there in
# seconds, its small dependencies from the index; elsewhere pip resolves `torch>=2.4` as usual. Installing it
# before the package keeps pip from pulling a multi-GB CUDA build to satisfy the loose requirement.
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if "$pip" install -q --no-index --no-deps torch==2.13.0 2>/dev/null; then
        "$pip" install -q torch==2.13.0
    else
        "$pip" install -q "torch>=2.4"
    fi
fi
"$pip" install -q -e ".[dev]"
