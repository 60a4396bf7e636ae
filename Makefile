# Miles developer entry points. Each target installs what it needs into .venv first.
#   make quickstart   run the CPU quickstart on the embedded engine (tiny model, synthetic task)
#   make test         run the test suite (what .ci/run calls)
#   make bench        CPU benchmarks, JSON into bench-results/
#   make bench-gpu    GPU benchmarks P1-P4 on a 2-GPU machine (no venv: the device has no network), into $OUT or bench-results/gpu
#   make moe-r3       MoE GRPO with R3 on 2 CPU trainer ranks (EP=2), configs/qwen3-moe-tiny-r3.yaml
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements/constraints-dev.txt | sha1sum | cut -c1-12)

.PHONY: venv test test-unit quickstart bench bench-gpu moe-r3 clean

venv: $(STAMP)

$(STAMP): setup.py requirements/constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints-dev.txt torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints-dev.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	PY=$(PY) tools/run-tests $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

QS_MODEL := .cache/models/qwen3-tiny
QS_DATA := .cache/data/quickstart.jsonl
QS_SFT := .cache/data/quickstart-sft.jsonl
MOE_MODEL := .cache/models/qwen3-moe-tiny

$(QS_MODEL)/config.json: tools/make_tiny_model.py | venv
	$(PY) tools/make_tiny_model.py $(QS_MODEL)

$(MOE_MODEL)/config.json: tools/make_tiny_model.py | venv
	$(PY) tools/make_tiny_model.py $(MOE_MODEL) --moe

$(QS_DATA): miles/rollout/synthetic.py | venv
	$(PY) -m miles.rollout.synthetic $(QS_DATA) --task repeat --num 256

$(QS_SFT): miles/rollout/synthetic.py | venv
	$(PY) -m miles.rollout.synthetic $(QS_SFT) --task repeat-sft --num 256 --seed 1

quickstart: venv $(QS_MODEL)/config.json $(QS_DATA) $(QS_SFT)
	$(PY) -m miles.driver --recipe quickstart $(ARGS)

bench: venv $(QS_MODEL)/config.json $(QS_DATA) $(QS_SFT)
	mkdir -p bench-results
	$(PY) tools/bench_engine.py --model-path $(QS_MODEL) --out bench-results/engine.json
	$(PY) tools/bench_rl_step.py --out bench-results/rl_step.json
	$(PY) tools/bench_r3.py --out bench-results/r3.json

GPU_PY ?= python3
bench-gpu:
	$(GPU_PY) tools/gpu/bench_gpu.py $(ARGS)

moe-r3: venv $(MOE_MODEL)/config.json $(QS_DATA) $(QS_SFT)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node 2 -m miles.driver --recipe qwen3-moe-tiny-r3 $(ARGS)

clean:
	rm -rf .cache bench-results runs
