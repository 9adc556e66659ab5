# nbalex: `make demo` runs the whole job from nothing, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO   ?= demo
# The demo's size (smaller values make a quick check of the whole chain).
DEMO_TRAIN ?= 120
DEMO_VAL   ?= 30
DEMO_EPOCHS ?= 16
DEMO_STEP  ?= 12
# PyTorch (CPU build, pinned) is the independent oracle in tests and the peer in benchmarks.
# Set NBALEX_TORCH= (empty) to skip it; the tests that need it then say so.
NBALEX_TORCH ?= torch==2.13.0

.PHONY: test demo clean-demo install bench-static clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,static,mpi]'
	@if [ -n "$(NBALEX_TORCH)" ]; then \
	  $(PIP) install -q "$(NBALEX_TORCH)" || echo "note: $(NBALEX_TORCH) could not be installed; PyTorch oracle tests will be skipped"; \
	fi
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# demo: 6 synthetic classes, alexnet-mini on the CPU in a few minutes.  The step schedule
# (lr/10 after epoch 12) replaces the paper's plateau rule here: with a 180-image validation
# set the first epochs sit at chance and the plateau rule cut the rate before learning began.
# Each run starts from nothing (the previous demo folder is cleared first), so it can be repeated.
demo: $(VENV)/.installed clean-demo
	$(VENV)/bin/nbalex synth $(DEMO)/images --classes 6 --train-per-class $(DEMO_TRAIN) --val-per-class $(DEMO_VAL)
	$(VENV)/bin/nbalex pack $(DEMO)/images/train $(DEMO)/train.h5 --size 64
	$(VENV)/bin/nbalex pack $(DEMO)/images/val $(DEMO)/val.h5 --size 64 --classes-from $(DEMO)/train.h5
	$(VENV)/bin/nbalex train --data $(DEMO)/train.h5 --val $(DEMO)/val.h5 --model alexnet-mini \
	    --epochs $(DEMO_EPOCHS) --batch-size 32 --lr 0.01 --schedule step --step-epochs $(DEMO_STEP) --out $(DEMO)/run
	$(VENV)/bin/nbalex eval --checkpoint $(DEMO)/run/checkpoint.h5 --data $(DEMO)/val.h5
	$(VENV)/bin/nbalex predict --checkpoint $(DEMO)/run/checkpoint.h5 --top 3 \
	    $$(ls $(DEMO)/images/val/*/*_00000.jpg | head -n 3)

bench-static: $(VENV)/.installed
	$(VENV)/bin/nbalex bench static

# clean-demo clears the demo's data and run folder and keeps .venv; clean removes both.
clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) .pytest_cache
