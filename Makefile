# Each target bootstraps its own in-repo virtualenv (fast when already current).
PYTEST_ARGS ?=

.PHONY: bench bench-quick demo demo-rl test test-compat test-engines venv venv-compat venv-engines

venv:
	@scripts/venv.sh .venv 3.11 constraints/py311.txt

venv-compat:
	@scripts/venv.sh .venv-compat 3.12 constraints/py312.txt

# The rollout engines' own virtualenvs (.venv-sglang, .venv-vllm; about 3 GB each)
venv-engines:
	@scripts/engine-venv.sh sglang
	@scripts/engine-venv.sh vllm

## make demo: LoRA fine-tune of a small GPT on CPU, TP=2 + sequence parallel (about 2 minutes)
demo: venv
	.venv/bin/megatron-lora demo $(DEMO_ARGS)

## make demo-rl: LoRA RL (GRPO) on CPU, TP=2 + SP, against a live SGLang server it starts and
## stops (builds .venv-sglang on first use; about 5 minutes once built)
demo-rl: venv
	.venv/bin/megatron-lora demo-rl $(DEMO_ARGS)

## make test: ruff check ., then the whole suite on Python 3.11, torch 2.13.0, megatron-core 0.16.1
test: venv
	.venv/bin/ruff check .
	.venv/bin/python -m pytest $(PYTEST_ARGS)

## make test-compat: ruff check ., then the same suite on Python 3.12, torch 2.14.1, megatron-core 0.19.2
test-compat: venv-compat
	.venv-compat/bin/ruff check .
	.venv-compat/bin/python -m pytest $(PYTEST_ARGS)

## make test-engines: live SGLang 0.5.15.post1 and vLLM 0.32.0 servers on 127.0.0.1, the trainer's
## weights synced to them (engine_tests/; not part of make test)
test-engines: venv venv-engines
	.venv/bin/python -m pytest engine_tests $(PYTEST_ARGS)

## make bench: CPU benchmarks (not part of make test); writes benchmarks/results.json, RESULTS.md, results.png
bench: venv venv-engines
	.venv/bin/python -m benchmarks.run_all $(BENCH_ARGS)

## make bench-quick: a smoke run of every benchmark, written to out/bench-quick/
bench-quick: venv venv-engines
	.venv/bin/python -m benchmarks.run_all --quick
