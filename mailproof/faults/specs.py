"""Fault rules as JSON, and a compact chaos-profile string for rehearsal command lines.

The sink service's ``POST /faults`` takes a rule as JSON; a client (``mailproof.capture.remote``) turns
its ``FaultRule`` objects into the same JSON. Both directions live here so they cannot drift.

A rule spec::

    {"stage": "rcpt", "to": "a@x", "scope": "t1", "action": {"reply": "451 4.3.0 later"}}

Keys: ``stage`` (required; connect, ehlo, mail, rcpt, data, after_data), ``action`` (required),
and optionally ``to`` (exact recipient), ``to_pattern`` (regex searched in each recipient),
``sender``, ``name``, ``scope``. Read back (``rule_to_spec``), a spec also has ``id``, ``fired``
and ``acted``.

Actions (one key each, ``script``/``after`` and ``delay``/``then`` go together)::

    "451 4.3.0 later"                        shorthand for {"reply": ...}
    null                                     shorthand for {"accept": true}
    {"reply": "451 4.3.0 later"}             answer with this reply (multi-line with "\\n")
    {"script": [a1, a2, ...], "after": a}    one step per matching event, then ``after`` forever
                                             (steps are actions, reply strings or null = accept)
    {"delay": 0.5, "then": a}                wait, then proceed (or do ``then``)
    {"stall": 30} / {"stall": null}          say nothing (then hang up / until the client quits)
    {"disconnect": true}                     hang up without a reply
    {"accept": true}                         proceed normally
    {"chaos": {"p": 0.05, "seed": 1, "action": a}}          with probability p, do ``a``
    {"rate_limit": {"per_second": 50, "reply": "451 ..."}}  past N per second, answer ``reply``
    {"tamper": {"find": "a", "replace": "b", "count": 1}}   change the body (stage data only)

A malformed spec raises ``FaultError`` naming the bad field (``action.script[1].delay: ...``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from mailproof.faults.actions import (STAGES, Accept, Chaos, Delay, Disconnect, FaultError,
                                      RateLimit, Reply, Script, Stall, Tamper, as_action)
from mailproof.faults.plan import FaultRule

__all__ = ["FaultError", "action_from_spec", "action_to_spec", "parse_chaos_profile",
           "rule_from_spec", "rule_to_spec", "RULE_KEYS"]

RULE_KEYS = ("stage", "action", "to", "to_pattern", "sender", "name", "scope")
_READ_ONLY_KEYS = ("id", "fired", "acted")  # present in specs read back; ignored on input


def _fail(path: str, problem: str) -> FaultError:
    return FaultError(f"{path}: {problem}")


def _number(value: Any, path: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, f"must be a number, not {value!r}")
    if value < minimum:
        raise _fail(path, f"must be at least {minimum:g}, not {value!r}")
    return float(value)


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"must be a non-empty string, not {value!r}")
    return value


def _reply(value: Any, path: str) -> Reply:
    text = _string(value, path)
    try:
        return Reply(text)
    except FaultError as exc:
        raise _fail(path, str(exc)) from None


def _only(spec: dict, allowed: tuple[str, ...], path: str) -> None:
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise _fail(f"{path}.{extra[0]}", f"unexpected key; an action here allows only {', '.join(allowed)}")


# -- JSON -> actions and rules ----------------------------------------------------------------


def action_from_spec(spec: Any, path: str = "action"):
    """Build a fault action from its JSON form (see the module docstring)."""
    if spec is None:
        return Accept()
    if isinstance(spec, str):
        return _reply(spec, path)
    if not isinstance(spec, dict) or not spec:
        raise _fail(path, f"must be an object like {{\"reply\": \"451 4.3.0 later\"}}, a reply string "
                          f"or null, not {spec!r}")
    if "reply" in spec:
        _only(spec, ("reply",), path)
        return _reply(spec["reply"], f"{path}.reply")
    if "script" in spec:
        _only(spec, ("script", "after"), path)
        steps = spec["script"]
        if not isinstance(steps, list):
            raise _fail(f"{path}.script", f"must be a list of actions, not {steps!r}")
        built = [action_from_spec(step, f"{path}.script[{i}]") for i, step in enumerate(steps)]
        after = action_from_spec(spec["after"], f"{path}.after") if spec.get("after") is not None else None
        return Script(built, after=after)
    if "delay" in spec:
        _only(spec, ("delay", "then"), path)
        seconds = _number(spec["delay"], f"{path}.delay")
        then = action_from_spec(spec["then"], f"{path}.then") if spec.get("then") is not None else None
        return Delay(seconds, then=then)
    if "stall" in spec:
        _only(spec, ("stall",), path)
        seconds = spec["stall"]
        return Stall(None if seconds is None else _number(seconds, f"{path}.stall"))
    if "disconnect" in spec:
        _only(spec, ("disconnect",), path)
        if spec["disconnect"] is not True:
            raise _fail(f"{path}.disconnect", "must be true")
        return Disconnect()
    if "accept" in spec:
        _only(spec, ("accept",), path)
        if spec["accept"] is not True:
            raise _fail(f"{path}.accept", "must be true")
        return Accept()
    if "chaos" in spec:
        _only(spec, ("chaos",), path)
        body = spec["chaos"]
        where = f"{path}.chaos"
        if not isinstance(body, dict):
            raise _fail(where, f"must be an object with p, action and optionally seed, not {body!r}")
        _only(body, ("p", "seed", "action"), where)
        if "p" not in body:
            raise _fail(f"{where}.p", "missing (a probability between 0 and 1)")
        p = _number(body["p"], f"{where}.p")
        if p > 1:
            raise _fail(f"{where}.p", f"must be between 0 and 1, not {p!r}")
        if "action" not in body:
            raise _fail(f"{where}.action", "missing (what to do when chaos strikes)")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _fail(f"{where}.seed", f"must be an integer or null, not {seed!r}")
        return Chaos(p, action_from_spec(body["action"], f"{where}.action"), seed=seed)
    if "rate_limit" in spec:
        _only(spec, ("rate_limit",), path)
        body = spec["rate_limit"]
        where = f"{path}.rate_limit"
        if not isinstance(body, dict):
            raise _fail(where, f"must be an object with per_second and optionally reply, not {body!r}")
        _only(body, ("per_second", "reply"), where)
        if "per_second" not in body:
            raise _fail(f"{where}.per_second", "missing (events allowed per second)")
        per_second = _number(body["per_second"], f"{where}.per_second")
        if per_second <= 0:
            raise _fail(f"{where}.per_second", "must be positive")
        if "reply" in body:
            reply = _reply(body["reply"], f"{where}.reply").reply
            return RateLimit(per_second, reply)
        return RateLimit(per_second)
    if "tamper" in spec:
        _only(spec, ("tamper",), path)
        body = spec["tamper"]
        where = f"{path}.tamper"
        if not isinstance(body, dict):
            raise _fail(where, f"must be an object with find, replace and optionally count, not {body!r}")
        _only(body, ("find", "replace", "count"), where)
        try:
            return Tamper(_string(body.get("find"), f"{where}.find"), body.get("replace"), body.get("count", 1))
        except FaultError as exc:
            raise _fail(where, str(exc)) from None
    raise _fail(f"{path}.{sorted(spec)[0]}", "unknown action; use one of reply, script, delay, stall, "
                                             "disconnect, accept, chaos, rate_limit, tamper")


def rule_from_spec(spec: Any) -> FaultRule:
    """A ``FaultRule`` (not yet added to a plan) from its JSON form."""
    if not isinstance(spec, dict):
        raise FaultError(f"a fault rule must be a JSON object, not {spec!r}")
    for key in spec:
        if key not in RULE_KEYS and key not in _READ_ONLY_KEYS:
            raise _fail(key, f"unknown rule field; use {', '.join(RULE_KEYS)}")
    if "stage" not in spec:
        raise _fail("stage", f"missing; use one of {', '.join(STAGES)}")
    if spec["stage"] not in STAGES:
        raise _fail("stage", f"unknown SMTP stage {spec['stage']!r}; use one of {', '.join(STAGES)}")
    if "action" not in spec:
        raise _fail("action", "missing, e.g. {\"reply\": \"451 4.3.0 try again later\"}")
    fields: dict[str, Any] = {}
    for key in ("to", "to_pattern", "sender", "scope"):
        if spec.get(key) is not None:
            fields[key] = _string(spec[key], key)
    if spec.get("name") is not None:
        if not isinstance(spec["name"], str):
            raise _fail("name", f"must be a string, not {spec['name']!r}")
        fields["name"] = spec["name"]
    if "to_pattern" in fields:
        try:
            re.compile(fields["to_pattern"])
        except re.error as exc:
            raise _fail("to_pattern", f"not a valid regular expression: {exc}") from None
    action = action_from_spec(spec["action"], "action")
    try:
        return FaultRule(stage=spec["stage"], action=action, **fields)
    except FaultError as exc:
        raise _fail("stage", str(exc)) from None


# -- actions and rules -> JSON ----------------------------------------------------------------


def action_to_spec(action: Any) -> Any:
    """The JSON form of an action (or of a reply string / None shorthand)."""
    action = as_action(action)
    if isinstance(action, Reply):
        return {"reply": action.reply.replace("\r\n", "\n")}
    if isinstance(action, Script):
        spec: dict = {"script": [action_to_spec(step) for step in action.steps]}
        if action.after is not None:
            spec["after"] = action_to_spec(action.after)
        return spec
    if isinstance(action, Delay):
        spec = {"delay": action.seconds}
        if action.then is not None:
            spec["then"] = action_to_spec(action.then)
        return spec
    if isinstance(action, Stall):
        return {"stall": action.seconds}
    if isinstance(action, Disconnect):
        return {"disconnect": True}
    if isinstance(action, Accept):
        return {"accept": True}
    if isinstance(action, Chaos):
        return {"chaos": {"p": action.p, "seed": action.seed, "action": action_to_spec(action.action)}}
    if isinstance(action, RateLimit):
        return {"rate_limit": {"per_second": action.per_second, "reply": action._reply.reply.replace("\r\n", "\n")}}
    if isinstance(action, Tamper):
        return {"tamper": {"find": action.find, "replace": action.replace, "count": action.count}}
    raise FaultError(f"action {action!r} has no JSON form; use one of the actions in mailproof.faults.actions")


def rule_to_spec(rule: FaultRule) -> dict:
    """The JSON form of a rule, with its id and counters."""
    spec: dict[str, Any] = {"id": rule.id, "stage": rule.stage, "action": action_to_spec(rule.action)}
    for key in ("to", "to_pattern", "sender", "scope"):
        if getattr(rule, key) is not None:
            spec[key] = getattr(rule, key)
    if rule.name:
        spec["name"] = rule.name
    spec["fired"] = rule.fired
    spec["acted"] = rule.acted
    return spec


# -- chaos profiles ---------------------------------------------------------------------------

_DEFAULT_TEXT = {
    "421": "421 4.3.2 mailproof chaos: service shutting down",
    "450": "450 4.2.1 mailproof chaos: mailbox busy, try again later",
    "451": "451 4.3.0 mailproof chaos: temporary failure, try again later",
    "452": "452 4.3.1 mailproof chaos: insufficient system storage",
    "550": "550 5.1.1 mailproof chaos: mailbox unavailable",
    "552": "552 5.3.4 mailproof chaos: message too big",
    "554": "554 5.0.0 mailproof chaos: transaction failed",
}
_CODE = re.compile(r"^[45]\d\d$")
_CHANCE = re.compile(r"^(\d+(?:\.\d+)?)%$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)/s$")


def _profile_reply(text: str, where: str) -> Reply:
    text = text.strip()
    if _CODE.match(text):
        text = _DEFAULT_TEXT.get(text, f"{text} {text[0]}.0.0 mailproof chaos")
    try:
        return Reply(text)
    except FaultError as exc:
        raise FaultError(f"{where}: {exc}") from None


def _profile_outcome(text: str, where: str):
    text = text.strip()
    if text == "disconnect":
        return Disconnect()
    if text == "stall":
        return Stall(None)
    for word, build in (("stall=", Stall), ("delay=", Delay)):
        if text.startswith(word):
            try:
                seconds = float(text[len(word):])
            except ValueError:
                raise FaultError(f"{where}: {word[:-1]} needs seconds, e.g. {word}0.5, not {text!r}") from None
            if not math.isfinite(seconds) or seconds < 0:
                raise FaultError(f"{where}: {word[:-1]} needs a non-negative number of seconds")
            return build(seconds)
    if text[:1] in ("4", "5"):
        return _profile_reply(text, where)
    raise FaultError(f"{where}: unknown outcome {text!r}; use a 4xx/5xx code (optionally with text), "
                     "disconnect, stall, stall=SECONDS or delay=SECONDS")


def _profile_stage(text: str, where: str) -> str:
    stage = text.strip()
    if stage not in STAGES:
        raise FaultError(f"{where}: unknown SMTP stage {stage!r}; use one of {', '.join(STAGES)}")
    return stage


def parse_chaos_profile(profile: str, *, seed: Optional[int] = None, scope: Optional[str] = None,
                        to_pattern: Optional[str] = None) -> list[FaultRule]:
    """Rules from a compact chaos profile, for rehearsal command lines.

    Grammar (items separated by commas, whitespace around items ignored)::

        profile  := item ("," item)*
        item     := CHANCE ":" STAGE ":" OUTCOME          e.g. 5%:rcpt:451
                  | "ratelimit:" RATE ":" STAGE [":" REPLY]   e.g. ratelimit:50/s:rcpt:451
        CHANCE   := number "%"                            0% to 100%
        RATE     := number "/s"                           events allowed per second
        STAGE    := connect | ehlo | mail | rcpt | data | after_data
        OUTCOME  := REPLY | "disconnect" | "stall" | "stall=" seconds | "delay=" seconds
        REPLY    := CODE [" " text]                       4xx or 5xx; a bare code gets a standard
                                                          text ("451 4.3.0 ..."); text may not
                                                          contain commas

    Example: ``"5%:rcpt:451,1%:after_data:disconnect,ratelimit:50/s:rcpt:451"`` is 5 % of
    recipients deferred with 451, 1 % of accepted messages followed by a hang-up before the reply
    (the client cannot know the mail was taken), and at most 50 recipients a second.

    ``seed`` makes the chaos repeatable (item i gets seed + i); ``scope`` tags every rule (so
    ``DELETE /faults?scope=...`` removes the profile); ``to_pattern`` limits every rule to
    matching recipients (only valid for stages from rcpt on).
    """
    if not isinstance(profile, str) or not profile.strip():
        raise FaultError("chaos profile: empty; e.g. '5%:rcpt:451,1%:after_data:disconnect'")
    rules: list[FaultRule] = []
    for index, item in enumerate(p.strip() for p in profile.split(",")):
        where = f"chaos profile item {index + 1} ({item!r})"
        if not item:
            raise FaultError(f"{where}: empty item (two commas in a row?)")
        parts = item.split(":", 3 if item.startswith("ratelimit:") else 2)
        match = {"to_pattern": to_pattern} if to_pattern else {}
        name = f"chaos:{item}"
        if parts[0] == "ratelimit":
            if len(parts) < 3:
                raise FaultError(f"{where}: use ratelimit:RATE/s:STAGE[:REPLY], e.g. ratelimit:50/s:rcpt:451")
            rate = _RATE.match(parts[1].strip())
            if not rate or float(rate.group(1)) <= 0:
                raise FaultError(f"{where}: rate {parts[1]!r} must look like 50/s (positive)")
            stage = _profile_stage(parts[2], where)
            reply = _profile_reply(parts[3], where).reply if len(parts) > 3 else None
            action = RateLimit(float(rate.group(1)), reply) if reply else RateLimit(float(rate.group(1)))
        else:
            if len(parts) != 3:
                raise FaultError(f"{where}: use CHANCE%:STAGE:OUTCOME, e.g. 5%:rcpt:451")
            chance = _CHANCE.match(parts[0].strip())
            if not chance:
                raise FaultError(f"{where}: chance {parts[0]!r} must look like 5% (or 0.5%)")
            p = float(chance.group(1)) / 100
            if p > 1:
                raise FaultError(f"{where}: chance {parts[0]!r} is more than 100%")
            stage = _profile_stage(parts[1], where)
            outcome = _profile_outcome(parts[2], where)
            action = Chaos(p, outcome, seed=None if seed is None else seed + index)
        try:
            rules.append(FaultRule(stage=stage, action=action, name=name, scope=scope, **match))
        except FaultError as exc:
            raise FaultError(f"{where}: {exc}") from None
    return rules
