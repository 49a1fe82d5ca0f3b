"""Rollout engine servers on this machine: SGLang and vLLM, each run from its own virtualenv
(`scripts/engine-venv.sh`), listening on 127.0.0.1, started and stopped by their pid with bounded
waits. What `make test-engines` (`engine_tests/`) and the RL demo start. These modules import
neither torch nor an engine (the engines run in their own processes; `sitecustomize/` is loaded
by the SGLang server, not here).

- `process.py`: one server process (start, wait until it answers, stop by pid on every path);
- `venvs.py`: where each engine's virtualenv is, and building it;
- `sglang.py`, `vllm.py`: each engine's command line on the CPU, and its known problems there;
- `sitecustomize/`: the CPU workarounds an SGLang server loads at start-up.
"""
