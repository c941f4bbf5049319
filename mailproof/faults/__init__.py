"""Faults injected on purpose at the capture sink: actions, rules, and the one ``Faults`` protocol.

    sink_faults.rule("rcpt", Script(["451 4.3.0 try later"] * 2), to=address)

See ``plan`` for who implements ``Faults`` and ``specs`` for the JSON form the sink service takes.
"""

from mailproof.faults.actions import (STAGES, Accept, Action, Chaos, Delay, Disconnect, FaultError,
                                      RateLimit, Reply, Script, Stall, Tamper, as_action)
from mailproof.faults.plan import FaultPlan, FaultRule, Faults, NoFaults, ScopedFaults
from mailproof.faults.specs import parse_chaos_profile, rule_from_spec, rule_to_spec

__all__ = ["STAGES", "Accept", "Action", "Chaos", "Delay", "Disconnect", "FaultError", "FaultPlan",
           "FaultRule", "Faults", "NoFaults", "RateLimit", "Reply", "Script", "ScopedFaults", "Stall", "Tamper",
           "as_action", "parse_chaos_profile", "rule_from_spec", "rule_to_spec"]
