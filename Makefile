# `make run` and `make test` set up .venv from the requirements when missing or changed, then act.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all e2e bench fuzz audit setup clean-venv pacs-tools

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamlit run dashboard.py

# The PACS tests' real parts (tests/orthanc.py starts its own Orthanc on free loopback ports): Debian's
# orthanc, orthanc-dicomweb and dicom3tools (dciodvfy). The packaged service is stopped, never used.
pacs-tools:
	@test -x /usr/sbin/Orthanc -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so -a -x /usr/bin/dciodvfy || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    orthanc orthanc-dicomweb dicom3tools && (service orthanc stop >/dev/null 2>&1 || true); }

test: $(STAMP) pacs-tools
	$(PY) -m pytest

# Everything, slow tests included (longer real training runs).
test-all: $(STAMP) pacs-tools
	$(PY) -m pytest -m "slow or not slow"

# Deep fuzzing: the properties of tests/test_fuzz.py with random, many more examples (FUZZ_EXAMPLES each;
# ``make test`` runs them derandomized with a few hundred). Add what it finds to tests/corpus/build.py.
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	MEDAI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py -q

# Dependency audit of everything installed in .venv (pip-audit; policy in SECURITY.md).
AUDIT_STAMP := $(VENV)/.installed-audit
$(AUDIT_STAMP): $(STAMP) requirements-audit.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-audit.txt
	touch $(AUDIT_STAMP)

audit: $(AUDIT_STAMP)
	$(PY) .ci/audit

# Real-browser suite (tests/e2e): Playwright + Debian's chromium (apt; its own browser download is not used).
E2E_STAMP := $(VENV)/.installed-e2e
$(E2E_STAMP): $(STAMP) requirements-e2e.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-e2e.txt
	touch $(E2E_STAMP)

/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

e2e: $(E2E_STAMP) /usr/bin/chromium
	$(PY) -m pytest tests/e2e -m e2e

# Benchmarks (print Markdown tables; results and how they were run are in benchmarks/RESULTS.md).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	cd benchmarks && for script in analyze_latency cam_speed api_load ddp_scaling inference_throughput train_throughput dashboard_memory; do ../$(PY) $$script.py || exit 1; done

clean-venv:
	rm -rf $(VENV)
