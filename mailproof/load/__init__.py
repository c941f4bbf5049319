"""Launch-day rehearsals: flows as Locust tasks, the ledger of every email, exact latencies,
SLO gates and the results file (``mailproof.load.results``, docs/results.md).

``mailproof rehearse`` (``mailproof.load.launcher``) starts the sink service, the app and Locust
on ``mailproof/load/locustfile.py``, which runs the @flow functions of FLOWS
(``mailproof.load.flows``). Locust is imported only by ``user``, ``shapes`` and that locustfile
(importing it monkey-patches the process with gevent): ``from mailproof.load import FlowUser`` in
a locustfile imports it, nothing else here does. In a process of your own, import Locust before
mailproof (``locust -f`` does): gevent must patch ``ssl`` before anything imports it.
"""

from mailproof.load.gates import DEFAULT_GATES, Gate, GateError, Verdict, evaluate
from mailproof.load.ledger import Ledger
from mailproof.load.results import RehearsalResults, ResultsError

__all__ = ["DEFAULT_GATES", "FastFlowUser", "FlowUser", "Gate", "GateError", "Ledger", "RehearsalResults", "ResultsError",
           "Verdict", "evaluate", "tasks_for"]


def __getattr__(name: str):
    if name in ("FastFlowUser", "FlowUser", "tasks_for"):
        from mailproof.extras import require

        require("locust", "running flows under Locust")
        from mailproof.load import user

        return getattr(user, name)
    raise AttributeError(f"module 'mailproof.load' has no attribute {name!r}")
