#!/usr/bin/env bash
# Create or refresh an in-repo virtualenv from pinned constraints; a no-op when it is current.
#   scripts/venv.sh VENV_DIR PYTHON_VERSION CONSTRAINTS_FILE
set -euo pipefail
venv=$1 pyver=$2 constraints=$3
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."

# The venv is current when it was built by this script from these constraints and pyproject.
# (The editable install is in "compat" mode, a path entry, so new packages need no reinstall.)
want=$(cat "$constraints" pyproject.toml "$self" | sha256sum | cut -c1-16)
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
    exit 0
fi

find_python() {
    if command -v "python$1" >/dev/null 2>&1 && "python$1" -c '' 2>/dev/null; then
        command -v "python$1"; return
    fi
    # pyenv installs other versions without putting them on PATH.
    for py in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1"; do
        [ -x "$py" ] && { echo "$py"; return; }
    done
    echo "error: no python$1 found (needed for $venv); install it or put it on PATH" >&2
    exit 1
}

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv with Python $pyver"
    "$(find_python "$pyver")" -m venv "$venv"
fi
echo "installing into $venv from $constraints"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$constraints" --config-settings editable_mode=compat -e ".[megatron,test]"
# The SGLang wheel the slime image pins (pinned in the constraints), not installed: its
# dependencies pin another torch. tests/test_sglang_adapter.py runs its pure-Python LoRA
# loading code from the wheel, which only this step can fetch (tests run offline).
"$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_34_x86_64 -c "$constraints" -d "$venv/share/megatron-lora" sglang
echo "$want" > "$venv/.installed"
