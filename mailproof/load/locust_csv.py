"""Locust's ``--csv`` files, brought up to the end of the run.

Locust writes ``<prefix>_stats.csv``, ``_failures.csv`` and ``_exceptions.csv`` from a greenlet
every ``locust.stats.CSV_STATS_INTERVAL_SEC`` (1 s) and not again when it quits (locust#1806,
#2299): what happened in the run's last second was missing, so a FLOW row could count a run fewer
than results.json and a late failure could be absent. On quitting, after the ledger has settled,
``write_final_csv`` writes the three files once more from Locust's own ``StatsCSV``, each written
aside and moved into place whole: a tick of Locust's writer after that writes to the file it
replaced. The history file (``_stats_history.csv``) is Locust's, one row a tick, as it was.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

log = logging.getLogger("mailproof.load.rehearsal")


def write_final_csv(environment: Any) -> list[str]:
    """Rewrite the ``--csv`` files of ``environment`` from its final statistics; the paths written
    (none without ``--csv``). An error writing one is logged, never raised: the run's verdict is
    in results.json, already written."""
    from locust import stats

    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return []
    writer = stats.StatsCSV(environment, stats.PERCENTILES_TO_REPORT)
    written = []
    for suffix, write in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv),
                          ("_exceptions.csv", writer.exceptions_csv)):
        path, aside = prefix + suffix, f"{prefix}{suffix}.{os.getpid()}.tmp"
        try:
            with open(aside, "w") as handle:  # as Locust opens them: the same bytes
                write(csv.writer(handle))
            os.replace(aside, path)
        except OSError as exc:
            log.error("mailproof: could not bring %s up to the end of the run (%s): it may miss the last second",
                      path, exc)
            continue
        written.append(path)
    return written
