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

.PHONY: demo test setup system-deps clean covid-nc-model

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

# NON-COMMERCIAL, optional: the demo model fine-tuned to know ground-glass opacity and consolidation too,
# from covid_seg_nc (CC BY-NC-SA images). Built here from ../shared, never shipped: docs/covid_nc_model.md.
# About 15 minutes on 2 CPU cores.
SHARED_CXR ?= ../shared/data/cxr
COVID_NC_WORK ?= work-data/covid-nc
COVID_NC_MODEL ?= models/xreal-demo-v3-covid-nc
covid-nc-model: setup
	rm -rf $(COVID_NC_WORK)
	$(ENGINE) prepare-data --cxr $(SHARED_CXR) --out $(COVID_NC_WORK)/data \
	  --subsets wingspan,hannover_unlabeled,covid_seg_nc
	$(ENGINE) train ldm --config xreal_engine/configs/ldm_covid_nc.yaml --init-from demo \
	  --vae xreal_engine/demo_model/vae --anatomy-controller xreal_engine/demo_model/anatomy_controller \
	  --data $(COVID_NC_WORK)/data --out $(COVID_NC_WORK)/run
	cp docs/covid_nc_model.md $(COVID_NC_WORK)/run/model/MODEL_CARD.md
	rm -rf $(COVID_NC_MODEL) && mkdir -p $(dir $(COVID_NC_MODEL)) && mv $(COVID_NC_WORK)/run/model $(COVID_NC_MODEL)
	@echo "Non-commercial model in $(COVID_NC_MODEL)/ (read its MODEL_CARD.md); use it with --model $(COVID_NC_MODEL)"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
