# mailproof: `make flows` runs the scenarios (Python, and SpamAssassin's spamd for the spam check),
# `make test` everything. Both first install the Debian packages they need (scripts/system-deps.sh,
# as root; otherwise it names the command) and set up .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ALLURE_RESULTS := reports/allure-results
PYTEST_ARGS ?=

.PHONY: flows test venv system-deps system-deps-flows clean rehearsal report rehearsal-report

EXAMPLE := examples/flask_shop

# The venv is rebuilt only when the requirements change (or it is missing). It holds mailproof
# with every extra and the test tools, and the example application's own dependencies.
$(STAMP): pyproject.toml $(EXAMPLE)/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -r $(EXAMPLE)/requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

# Dovecot, Postfix, Chromium, SpamAssassin, Node.js and npm for the full suite (the flows need
# only SpamAssassin's spamd: system-deps-flows): installed with apt-get when missing and running as
# root; otherwise stops with the command to run. `sh scripts/system-deps.sh --check` only reports.
system-deps:
	@sh scripts/system-deps.sh

system-deps-flows:
	@sh scripts/system-deps.sh --flows

# Allure results are cleaned here, outside pytest: --clean-alluredir races between xdist workers.
flows: system-deps-flows $(STAMP)
	rm -rf $(ALLURE_RESULTS) && mkdir -p $(ALLURE_RESULTS)
	$(PY) -m pytest flows/ --alluredir=$(ALLURE_RESULTS) $(PYTEST_ARGS)

# The harness's own tests, the demo's flows and the example application's flows (someone else's
# app: Flask + Flask-Mail, started by its own command). The flows run twice: on the in-process
# sink, and through real servers (Postfix -> Dovecot -> IMAP; Postfix only as root, else the sink
# relays over LMTP). On the IMAP run the tests marked
# sink_faults (they inject faults at the capture sink, which is not in that path) are deselected.
# Then the demo's flows once per provider transport (the app sends through each provider's
# official client into the provider capture); sink_faults tests are deselected there too.
PROVIDER_TRANSPORTS := sendgrid mailgun ses postmark
test: system-deps $(STAMP)
	rm -rf $(ALLURE_RESULTS) && mkdir -p $(ALLURE_RESULTS)
	$(PY) -m pytest tests/ flows/ $(EXAMPLE)/ --alluredir=$(ALLURE_RESULTS) $(PYTEST_ARGS)
	$(PY) -m pytest flows/ $(EXAMPLE)/ --mailbox=imap $(PYTEST_ARGS)
	for transport in $(PROVIDER_TRANSPORTS); do \
	    $(PY) -m pytest flows/ --transport $$transport $(PYTEST_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) $(ALLURE_RESULTS) reports/allure-report .pytest_cache

# A short headless launch-day rehearsal against the demo app: `mailproof rehearse` on the demo's
# load flows (loadtests/flows.py), with the demo app and its validation fake (loadtests/demo.py).
# reports/rehearsal/ gets results.json, Locust's CSV/HTML/log and report.html. mailproof exits 0
# when every SLO gate passed, 3 when one failed, 2 on a setup error; make itself returns 2 for any
# failure, so a CI job that needs the difference runs `.venv/bin/mailproof rehearse ...` directly.
# E.g. make rehearsal REHEARSAL_ARGS="--workers 2" REHEARSAL_LOAD="-u 100 -r 100 -t 20s"
REHEARSAL_LOAD ?= --shape burst --peak-rate 20 --duration 60
REHEARSAL_ARGS ?=
rehearsal: $(STAMP)
	$(VENV)/bin/mailproof rehearse -f loadtests/flows.py --app '$(PY) -m loadtests.demo' \
	    --app-ready 'READY (http://\S+)' --out reports/rehearsal $(REHEARSAL_LOAD) $(REHEARSAL_ARGS)

# QA's Allure 3 report, one file that opens from disk (needs node and npm; Allure 3 is pinned in
# mailproof/report/allure/package-lock.json and installed by npm ci into ~/.cache/mailproof).
report: $(STAMP)
	$(PY) -m mailproof.report.allure_build --results $(ALLURE_RESULTS) --output reports/allure-report

rehearsal-report: $(STAMP)
	$(PY) -m mailproof.report.rehearsal reports/rehearsal/results.json --keep-previous -o reports/rehearsal/report.html
