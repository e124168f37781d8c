# Two commands matter: `make demo` and `make test`. Both bootstrap everything they need.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt setup.py fastpipe/data/_cropdecode.cpp | sha256sum | cut -c1-16)
DATA    := data
DEMO    := $(DATA)/demo

.PHONY: setup test demo bench lint clean sysdeps diskcheck fashion-mnist wheelhouse gpubox-sim

setup: $(STAMP)

# FFCV compiles against OpenCV and libjpeg-turbo, fastpipe's crop decoder against OpenCV and libjpeg's
# own API (libjpeg-dev); install them when pkg-config cannot see them.
SYSPKGS := pkg-config libopencv-dev libturbojpeg0-dev libjpeg-dev
# $(call apt_install,PACKAGES,what to say without root or sudo): apt-get as root, else through sudo
apt_install = if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else $(2); fi
sysdeps:
	@if pkg-config --exists opencv4 libturbojpeg libjpeg 2>/dev/null; then :; \
	else $(call apt_install,$(SYSPKGS),echo "fastpipe needs system libraries for ffcv. Run:  sudo apt-get install -y $(SYSPKGS)" >&2; exit 1); fi

# Fashion-MNIST (70,000 real 28 px photos, Debian's dataset-fashion-mnist, 31 MB): the real small-image set
# of `python -m benchmarks quality/lr-sweep` and one test. Without root it says how; its tests then skip.
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
fashion-mnist:
	@if [ -f $(FASHION) ]; then :; \
	else $(call apt_install,dataset-fashion-mnist,echo "note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist); its test will skip" >&2); fi

# A new venv takes ~7 GB (torch's CUDA build with its libraries, DALI, ffcv); say so before pip fails half-way.
VENV_GB := 8
# The venv's folder may not exist yet: measure the nearest one that does.
diskcheck:
	@test -x $(VPY) || { d="$(abspath $(VENV))"; while [ ! -d "$$d" ]; do d=$$(dirname "$$d"); done; \
	free=$$(df -Pk "$$d" | awk 'NR==2{print int($$4/1048576)}'); \
	case "$$free" in ''|*[!0-9]*) echo "fastpipe: could not read the free space of $$d (df said: $$free); carrying on" >&2; exit 0;; esac; \
	if [ "$$free" -lt $(VENV_GB) ]; then echo "fastpipe's venv needs about $(VENV_GB) GB free; $$d has $$free GB." \
		"Free some space (old venvs, runs/, data/) or put the venv on a larger disk: make VENV=/path/to/venv ..." >&2; exit 1; fi; }

$(STAMP): pyproject.toml constraints.txt setup.py fastpipe/data/_cropdecode.cpp
	@$(MAKE) --no-print-directory sysdeps diskcheck
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	# numpy and cython first: ffcv's setup.py imports numpy while building
	$(VPY) -m pip install -q -c constraints.txt numpy cython pkgconfig
	$(VPY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[dali,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup fashion-mnist
	$(VPY) -m pytest -q tests

demo: setup
	$(VPY) -m convert synthetic --out $(DEMO)/images --classes 10 --per-class 60 --val-per-class 12
	$(VPY) -m convert folder $(DEMO)/images --out $(DEMO)/betons
	$(VPY) -m fastpipe.train --config cpu-smoke.toml --data.path=$(DEMO)/betons --run.dir=runs/demo
	$(VPY) -m benchmarks loaders --data $(DEMO)/betons --backends ffcv,dali,torch --res 128 \
		--workers 2 --batch-size 64 --epochs 2 --out runs/demo/loader-report
	@echo "demo outputs: runs/demo (metrics.csv, plots/*.png, summary.json) and runs/demo/loader-report"

bench: setup
	$(VPY) -m pytest benchmarks --benchmark-json=runs/bench.json

lint: setup
	$(VPY) -m ruff check convert fastpipe benchmarks tests

clean:
	rm -rf $(VENV) runs $(DATA)

# The GPU box (Python 3.12, torch 2.11 preinstalled, no package registry): wheelhouse/ holds every wheel it
# lacks, for Python 3.12 and 3.11, large ones in 55 MB parts (README, "GPU box, offline"). gpubox-sim proves
# the README's install line on a stand-in box with the network off (about 10 min; not part of `make test`).
PY312 ?= $(shell pyenv prefix 3.12 2>/dev/null || true)/bin/python3.12
need312 = @test -x "$(PY312)" || { echo "needs a Python 3.12 for the GPU box's wheels: set PY312=/path/to/python3.12" >&2; exit 1; }
wheelhouse: setup
	$(need312)
	$(VPY) -m benchmarks.gpubox wheelhouse --out wheelhouse --python $(PY312) --python $(abspath $(VPY))

gpubox-sim: wheelhouse
	$(VPY) -m benchmarks.gpubox sim --wheelhouse wheelhouse --python $(PY312) --out runs/gpubox-sim
