# distq: `make demo` trains the default job, `make test` runs lint and the whole test suite
# (with the optional engines of `make extras`: DeepSpeed, Horovod, Lightning, Accelerate,
# Hugging Face transformers).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.distq-installed
EXTRAS_STAMP := $(VENV)/.distq-extras

.PHONY: demo test lint system-deps extras clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/torchrun --standalone --nproc_per_node=2 -m distq.launch.train

test: $(STAMP) lint system-deps extras
	DISTQ_REQUIRE_EXTRAS=1 $(BIN)/pytest -q

# Optional engines; torch is named so pip keeps the CPU build. Horovod is built from source
# once (~4 min) by .ci/install-horovod.sh and its wheel cached in ~/.cache/distq/wheels.
# --upgrade-strategy eager: an existing venv moves to the newest releases within the declared
# ranges, the versions a fresh install resolves, so the tests run what users get.
extras: $(EXTRAS_STAMP)

$(EXTRAS_STAMP): $(STAMP) pyproject.toml .ci/install-horovod.sh
	bash .ci/install-horovod.sh $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade --upgrade-strategy eager \
		-e '.[dev,deepspeed,horovod,lightning,accelerate,transformers]' torch==2.13.0
	touch $@

system-deps:
	bash .ci/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
