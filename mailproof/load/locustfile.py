"""The locustfile of ``mailproof rehearse``: the @flow functions of FLOWS as weighted Locust tasks.

The command runs ``locust -f <this file>`` (and its workers) with the environment:

- ``MAILPROOF_FLOWS`` (required): the flows module or file (mailproof.load.flows);
- ``MAILPROOF_FLOW_MIX``: ``name=W,...`` weights (default: each flow's own);
- ``MAILPROOF_SHAPE``: a load shape (mailproof.load.shapes.ShapeConfig.encode): flows start on
  its schedule of arrivals (open model; users are the concurrency cap); without it Locust's
  ``-u/-r/-t`` drive the run (closed model);
- ``MAILPROOF_WORKERS``: how many workers share the shape's arrivals (default 1);
- ``MAILPROOF_PACING``: without a shape, seconds between the starts of one user's flows (default 1);
- ``MAILPROOF_CLIENT``: ``fast`` (FastFlowUser, geventhttpclient; the default) or ``requests``
  (FlowUser, Locust's requests-based HttpUser): what ``flow.http`` runs on.

By hand, for a distributed run on several machines:
``MAILPROOF_FLOWS=myapp/loadflows.py locust -f $(python -c 'import mailproof.load.locustfile as f; print(f.__file__)') ...``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Locust put this file's folder (mailproof/load) first on the import path: its modules (flows,
# shapes, ...) would shadow the user's top-level ones (the demo's `flows` package, say).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]

from locust import constant_pacing, events  # noqa: E402

from mailproof.load.flows import FlowsError, load_flows  # noqa: E402
from mailproof.load.user import CLIENTS  # noqa: E402

_SOURCE = os.environ.get("MAILPROOF_FLOWS", "")
if not _SOURCE:
    raise SystemExit("mailproof: set MAILPROOF_FLOWS to the flows module or file "
                     "(this locustfile is what `mailproof rehearse -f FLOWS` runs)")
try:
    LOADED = load_flows(_SOURCE)
    MIX = LOADED.mix(os.environ.get("MAILPROOF_FLOW_MIX", ""))
except FlowsError as exc:
    raise SystemExit(f"mailproof: {exc}") from None
_CLIENT = os.environ.get("MAILPROOF_CLIENT", "") or "fast"
if _CLIENT not in CLIENTS:
    raise SystemExit(f"mailproof: MAILPROOF_CLIENT={_CLIENT!r}: the client is one of {', '.join(CLIENTS)} "
                     "(mailproof rehearse --client)")


class RehearsalUser(CLIENTS[_CLIENT]):  # type: ignore[misc,valid-type]
    flows = MIX
    # Without a shape (closed model). With one, a user waits for its next arrival instead (FlowUser).
    wait_time = constant_pacing(float(os.environ.get("MAILPROOF_PACING", "1")))


@events.init.add_listener
def _notes(environment, **_kw) -> None:
    """Flows FLOWS has that cannot run under load are named in the results (once: not by workers)."""
    from mailproof.load.rehearsal import Rehearsal

    rehearsal = Rehearsal.of(environment)
    if rehearsal.role != "worker":
        rehearsal.notes.extend(LOADED.notes())


if os.environ.get("MAILPROOF_SHAPE"):
    from mailproof.load.shapes import ShapeConfig, shape_class

    RehearsalShape = shape_class(ShapeConfig.decode(os.environ["MAILPROOF_SHAPE"]))
