# Set-up and everyday commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch/torchvision pair that installs and imports on the project's machines
# (x86_64, Python 3.11). The package itself only asks for ranges (pyproject.toml);
# override on other machines, e.g. `make test TORCH_PIN="torch==2.9.1 torchvision==0.24.1"`.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e '.[dev,export,lora,tracking,tune]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tlkd finetune configs/demo.yaml

# one test process per core (pytest-xdist; idle ones take queued tests from busy ones), one
# thread each
test: $(STAMP)
	$(PY) -m pytest -n auto --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check tlkd tests bench
	$(VENV)/bin/ruff format --check tlkd tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
