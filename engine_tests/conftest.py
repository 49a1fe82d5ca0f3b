"""The live-engine tier (`make test-engines`; plain `pytest` collects only `tests/`): real SGLang
and vLLM servers on 127.0.0.1, each started once per session from its own virtualenv
(`engine_servers/`) and stopped by its pid whatever happens (the fixture's `finally`, and
`engine_servers.process`'s atexit and signal hooks). A server that cannot start fails the tests
that need it; only an engine virtualenv that was never built skips them, naming how to build it.

The trainer runs in gloo rank processes (`megatron_cpu.launch.run_on_ranks`), each server in its
own process; the test process starts both and judges what the ranks return.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' `support` package (ranks import it too)

from engine_servers import sglang, venvs, vllm  # noqa: E402

MAX_LORA_RANK = 8
STARTED: dict[str, float] = {}  # engine -> seconds from start to its first answer
MEASURED: dict[str, str] = {}  # test id -> what it measured, printed at the end


def require_venv(engine: str) -> None:
    if not venvs.built(engine):
        pytest.skip(f"{venvs.venv_dir(engine).name} is not built: `make test-engines` builds it "
                    f"(scripts/engine-venv.sh {engine})")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    from support import engine_model

    return str(engine_model.write(tmp_path_factory.mktemp("engine-model") / "qwen2"))


def _serve(engine: str, model_dir: str, logs: Path):
    require_venv(engine)
    module = {"sglang": sglang, "vllm": vllm}[engine]
    server = module.server(model_dir, log_path=logs / f"{engine}.log",
                           max_lora_rank=MAX_LORA_RANK)
    try:
        STARTED[engine] = server.wait_ready(module.READY_PATH, module.STARTUP_TIMEOUT)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sglang_server(model_dir, tmp_path_factory):
    yield from _serve("sglang", model_dir, tmp_path_factory.mktemp("sglang-logs"))


@pytest.fixture(scope="session")
def vllm_server(model_dir, tmp_path_factory):
    yield from _serve("vllm", model_dir, tmp_path_factory.mktemp("vllm-logs"))


def pytest_terminal_summary(terminalreporter):
    for engine, seconds in STARTED.items():
        terminalreporter.write_line(f"{engine} server answered {seconds:.0f} s after its start")
    for name, text in MEASURED.items():
        terminalreporter.write_line(f"{name}: {text}")
