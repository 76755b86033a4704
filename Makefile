# The two commands a new user runs: `make demo` and `make test`.
# Everything else here is what they need: a virtual environment with the CPU
# build of torch that lies on this machine's disk, the engine, and (for the
# tests) the Debian DICOM tools and Orthanc.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ENGINE := $(VENV)/bin/xreal-engine
DEMO_OUT ?= demo-output
DEBIAN_TEST_PACKAGES := dicom3tools dcmtk orthanc orthanc-dicomweb openssl
# pytest -n is not used: 2 cores; tests with torch use tiny configs.
PYTEST_ARGS ?=

.PHONY: demo test setup system-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

# Debian packages used by the tests as independent DICOM readers and as a real PACS.
system-deps:
	@missing=""; \
	for tool in dciodvfy dcmdump Orthanc openssl; do command -v $$tool >/dev/null 2>&1 || missing="yes"; done; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="yes"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "Installing Debian packages: $(DEBIAN_TEST_PACKAGES)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEBIAN_TEST_PACKAGES) >/dev/null; \
	fi

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	rm -rf $(DEMO_OUT)
	$(ENGINE) generate --model demo --anatomy Resources/Templates/anatomy_01.png \
	  --pathology-mask Resources/Templates/pathology_cardiomegaly.png --finding cardiomegaly \
	  --seed 0 --out $(DEMO_OUT)
	@echo "Demo results are in $(DEMO_OUT)/ (sc.dcm, seg.dcm, preview.png, provenance.json)"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
