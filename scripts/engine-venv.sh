#!/usr/bin/env bash
# Create or refresh a rollout engine's own virtualenv (.venv-sglang, .venv-vllm) from its lock in
# constraints/; a no-op when it is current. The engines pin other torch, transformers and numpy
# versions than the trainer's .venv, so each runs from its own.
#   scripts/engine-venv.sh sglang|vllm
set -euo pipefail
kind=$1
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."
venv=.venv-$kind lock=constraints/$kind.txt
[ -f "$lock" ] || { echo "error: no $lock (engines: sglang, vllm)" >&2; exit 2; }

want=$(cat "$lock" "$self" | sha256sum | cut -c1-16)
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
    exit 0
fi
python=$(command -v python3.11 || true)
[ -n "$python" ] || { echo "error: no python3.11 found (needed for $venv)" >&2; exit 1; }
rm -rf "$venv"  # a lock installed with --no-deps leaves stale packages otherwise
echo "creating $venv from $lock (about 3 GB)"
"$python" -m venv "$venv"
# The whole lock, no resolver: torch 2.13.0+cpu is the local CPU wheel pip finds on these
# machines; nothing pulls a CUDA build.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$lock"
echo "$want" > "$venv/.installed"
