"""Launch-day rehearsals: flows as Locust tasks, the ledger of every email, exact latencies,
SLO gates and the results file.

Locust is imported only by ``locust_user`` (importing it monkey-patches the process with
gevent): ``from mailproof.load import FlowUser`` in a locustfile imports it, nothing else here does.
"""

from mailproof.load.gates import DEFAULT_GATES, Gate, GateError, Verdict, evaluate
from mailproof.load.ledger import Ledger

__all__ = ["DEFAULT_GATES", "FlowUser", "Gate", "GateError", "Ledger", "Verdict", "evaluate", "tasks_for"]


def __getattr__(name: str):
    if name in ("FlowUser", "tasks_for"):
        from mailproof.extras import require

        require("locust", "running flows under Locust")
        from mailproof.load import locust_user

        return getattr(locust_user, name)
    raise AttributeError(f"module 'mailproof.load' has no attribute {name!r}")
