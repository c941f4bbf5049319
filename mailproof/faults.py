"""Fault rules scoped to one test (or one flow run), removed automatically when it ends.

The actions themselves (Reply, Script, Delay, Stall, Disconnect, Chaos, RateLimit) live with
the sink in ``fakes.smtp_faults`` and are re-exported here for flows and tests.
"""

from __future__ import annotations

from typing import Any

from fakes.smtp_faults import (STAGES, Accept, Chaos, Delay, Disconnect, FaultError, FaultPlan,
                               FaultRule, RateLimit, Reply, Script, Stall)

__all__ = ["STAGES", "Accept", "Chaos", "Delay", "Disconnect", "FaultError", "FaultPlan", "FaultRule",
           "RateLimit", "Reply", "Script", "ScopedFaults", "Stall"]


class ScopedFaults:
    """Adds rules to a plan under one scope; ``clear()`` removes exactly those."""

    def __init__(self, plan: FaultPlan, scope: str) -> None:
        self.plan = plan
        self.scope = scope

    def rule(self, stage: str, action: Any, **match: Any) -> FaultRule:
        return self.plan.add(FaultRule(stage=stage, action=action, scope=self.scope, **match))

    @property
    def rules(self) -> list[FaultRule]:
        return [r for r in self.plan.rules if r.scope == self.scope]

    def clear(self) -> int:
        return self.plan.clear(scope=self.scope)
