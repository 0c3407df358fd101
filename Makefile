# Quick start: `make run` trains the default recipe, `make test` runs the tests.
# Both set up .venv idempotently; torch is installed only when none is importable.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.rnnkit-installed
TRITON_STAMP := $(VENV)/.rnnkit-triton

.PHONY: run test test-all lint bench setup clean FORCE

# A venv whose interpreter no longer runs (its base Python was removed or upgraded away) or that lost
# rnnkit or torch is set up again: the stamp alone would call it installed.
ifneq ($(shell $(VPY) -c "import importlib.util as u; assert u.find_spec('rnnkit') and u.find_spec('torch')" \
                >/dev/null 2>&1 && echo ok),ok)
REPAIR := FORCE
endif
# Likewise a venv whose Triton went missing after its stamp was written (the tests would skip quietly).
ifneq ($(shell $(VPY) -c "import importlib.util as u; assert u.find_spec('triton')" >/dev/null 2>&1 && echo ok),ok)
TRITON_REPAIR := FORCE
endif

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh $(REPAIR)
	@PY=$(PY) bash scripts/setup_venv.sh $(VENV)
	@touch $(STAMP)

# Triton only for the tests (scripts/setup_triton.sh), after the venv itself; a failed install leaves
# no stamp (the next run tries again) and the tests go on without it.
$(TRITON_STAMP): $(STAMP) scripts/setup_triton.sh $(TRITON_REPAIR)
	@bash scripts/setup_triton.sh $(VENV) && touch $(TRITON_STAMP) || true

run: $(STAMP)
	$(VENV)/bin/rnnkit train $(ARGS)

test: $(STAMP) $(TRITON_STAMP)
	$(VPY) -m ruff check src tests benchmarks examples
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) $(TRITON_STAMP)
	$(VPY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

FORCE:
