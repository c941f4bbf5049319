"""Kept for locustfiles written against it: ``FlowUser`` and ``tasks_for`` live in
``mailproof.load.user`` (import them as ``from mailproof.load import FlowUser, tasks_for``)."""

from mailproof.load.user import FastFlowUser, FlowUser, LocustReporter, tasks_for

__all__ = ["FastFlowUser", "FlowUser", "LocustReporter", "tasks_for"]
