"""DKIM (RFC 6376): verify every signature with dkimpy, offline, and say why one fails.

The public key comes from the harness's key table (``CheckConfig.dkim_keys``, filled with
``config.add_dkim_key``), handed to dkimpy as its ``dnsfunc``: no DNS server is ever asked, so
a check cannot pass or fail on the network. The reasons are told apart from what dkimpy
reports: no signature; no key for the signature's ``s=``/``d=``; a body hash mismatch (the
body changed after signing); a signature that does not verify over the signed headers (a
signed header changed, or another key signed); a malformed signature.
"""

from __future__ import annotations

import logging
import re
import time
from email.utils import getaddresses

from mailproof.checks.config import CheckConfig
from mailproof.checks.result import FAILED, PASSED, WARNING, CheckResult
from mailproof.extras import require

SOURCE = "RFC 6376 (DKIM), verified with dkimpy against the harness's key table (no DNS)"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _tags(value: bytes) -> dict[str, str]:
    tags = {}
    for item in value.decode("ascii", "replace").split(";"):
        if "=" in item:
            key, _, val = item.partition("=")
            tags[key.strip()] = "".join(val.split())
    return tags


def check_dkim(msg, config: CheckConfig) -> CheckResult:
    dkim = require("dkim", "the DKIM check")
    started = time.perf_counter()
    raw = msg.raw
    signatures = msg.header_all("DKIM-Signature")
    if not signatures:
        return CheckResult("dkim", FAILED, "no DKIM-Signature header: the email is not signed",
                           ("mailbox providers treat unsigned mail as unauthenticated (and DMARC fails)",),
                           SOURCE, time.perf_counter() - started)
    from_domains = {addr.rsplit("@", 1)[-1].lower() for _, addr in getaddresses([msg.from_]) if "@" in addr}
    failures, warnings, passes = [], [], []
    for index, header in enumerate(signatures):
        tags = _tags(header.encode("ascii", "replace"))
        label = f"signature {index + 1} (d={tags.get('d', '?')}, s={tags.get('s', '?')})"
        missed: list[str] = []

        def dnsfunc(name, timeout=5, _missed=missed):
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
            record = config.dkim_record(text)
            if record is None:
                _missed.append(text.rstrip("."))
            return record

        # A logger of its own, outside logging's registry (getLogger would keep one per check
        # forever): dkimpy reports key errors only there.
        logger = logging.Logger("mailproof.checks.dkim")
        collect = _Collect()
        logger.addHandler(collect)
        try:
            verifier = dkim.DKIM(raw, logger=logger)
            try:
                ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
            except dkim.ValidationError as exc:
                ok, why = False, str(exc)
                if why.startswith("body hash mismatch"):
                    why = ("body hash mismatch: the body was changed after signing (the bh= the "
                           f"signer computed does not match the body as received; {exc})")
                failures.append(f"{label}: {why}")
                continue
            except dkim.DKIMException as exc:
                failures.append(f"{label}: malformed: {type(exc).__name__}: {exc}")
                continue
        finally:
            logger.removeHandler(collect)
        if ok:
            passes.append(f"{label}: valid over h={tags.get('h', '')}")
            if "l" in tags:
                warnings.append(f"{label}: l={tags['l']} signs only part of the body: content can be appended")
            if from_domains and not any(d == tags.get("d", "").lower() or d.endswith("." + tags.get("d", "").lower())
                                        for d in from_domains):
                warnings.append(f"{label}: d={tags.get('d')} is not the From domain {sorted(from_domains)} "
                                "(no DMARC alignment)")
        elif missed:
            failures.append(f"{label}: missing key: no public key for {missed[0]} in the harness's key table "
                            f"(known: {sorted(config.dkim_keys) or 'none'}); add it with "
                            "mailproof.checks.config.add_dkim_key(domain, selector, public_key)")
        elif collect.lines:
            failures.append(f"{label}: bad key: {'; '.join(collect.lines)}")
        else:
            signed = [h for h in re.split(r"\s*:\s*", tags.get("h", "")) if h]
            present = {name.lower() for name, _ in msg.headers}
            absent = [h for h in signed if h.lower() not in present]
            failures.append(
                f"{label}: signature/header mismatch: the signature does not verify over the signed headers "
                f"(h={':'.join(signed)}): a signed header was changed, added or removed after signing, or "
                "another key signed it" + (f"; signed but absent now: {absent}" if absent else ""))
    details = tuple(failures + warnings + passes)
    if passes and not failures:
        verdict, summary = (WARNING if warnings else PASSED), f"{len(passes)} valid signature(s)"
    elif passes:
        verdict, summary = WARNING, f"{len(passes)} valid, {len(failures)} failing signature(s)"
    else:
        verdict, summary = FAILED, failures[0]
    return CheckResult("dkim", verdict, summary, details, SOURCE, time.perf_counter() - started)
