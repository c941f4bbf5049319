"""Mutation testing of the harness's core: would the unit tests notice a broken verdict?

mutmut 3 (the ``mutation`` extra) rewrites every function of the modules below into many
mutants (``<`` for ``<=``, ``and`` for ``or``, a constant changed, a call's argument dropped, ...)
and runs, for each, only the tests that call that function; a mutant no test fails on
*survived*. This script prints per module and in total how many were killed, survived, timed out
or were never reached by a test, the share that survived (``no tests`` counts as survived), and
every survivor with its note from ``NOTES`` (why it is kept: an equivalent mutant, text only a
human reads, ...). It exits 1 when more than ``--max-share`` survive or a survivor has no note.

It is a benchmark-like tool, not part of CI. It works in ``build/mutation/`` (git-ignored): a
``pyproject.toml`` made of the project's own plus the ``[tool.mutmut]`` section below, and
symlinks to ``mailproof/`` and ``tests/``; mutmut copies them to ``build/mutation/mutants/`` and
imports the mutants from there (they come first on ``sys.path``, before the editable install's
finder, which only answers for what nothing on the path has). Results are kept between runs:
mutmut retests only the functions that changed; ``--fresh`` starts over.

    nice -n 10 .venv/bin/python benchmarks/mutation.py --fresh     # 13-20 min on 2 shared cores
    .venv/bin/python benchmarks/mutation.py --report               # the last run's figures only
    .venv/bin/python benchmarks/mutation.py 'mailproof.criteria*'  # one module (mutmut's globs)

Each mutant has a time limit, ``(its tests' clean time + TIMEOUT_CONSTANT) * TIMEOUT_MULTIPLIER``
of wall-clock time and twice that of CPU time (mutmut's SIGXCPU): a mutant that hangs a wait or
loops is a timeout, which counts as killed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"

# The core of every verdict. message_parts, message_text and message_html (another 1,135 mutants)
# are left out: each of their functions is reached by 150-220 tests taking 25-32 s, about two
# hours on the 2 shared cores. ``--message-parts`` adds them.
MODULES = [
    "mailproof/mailbox.py",
    "mailproof/criteria.py",
    "mailproof/load/ledger.py",
    "mailproof/load/gates.py",
    "mailproof/load/latency.py",
    "mailproof/message.py",
]
MESSAGE_PARTS = ["mailproof/message_parts.py", "mailproof/message_text.py", "mailproof/message_html.py"]

# The unit tests of those modules. test_rehearsal.py's first tests run Locust and the sink
# service as subprocesses (minutes each, and they would not see the mutants): deselected.
# The list is fixed (not globbed): mutmut throws every result away when the selection changes, and
# keeps them when only the tests inside it change (it then retests only what it is asked to).
TESTS = [
    "tests/test_mailbox.py",
    "tests/test_verdicts.py",
    "tests/test_message.py",
    "tests/test_message_hostile.py",
    "tests/test_rehearsal.py",
    # written to kill the survivors of this script's first runs
    "tests/test_mutants_criteria.py",
    "tests/test_mutants_gates.py",
    "tests/test_mutants_latency.py",
    "tests/test_mutants_ledger.py",
    "tests/test_mutants_mailbox.py",
    "tests/test_mutants_message.py",
]
END_TO_END = [
    "test_flask_shop_rehearsal_runs_exactly_the_users_asked_and_accounts_for_every_email",
    "test_flows_whose_requests_all_get_404_fail_the_run_with_their_failures_and_lose_nothing",
    "test_resent_and_stray_mail_in_a_real_rehearsal_are_duplicated_and_unexpected",
    "test_ten_short_demo_rehearsals_find_no_false_lost_mail",
    "test_an_impossible_gate_fails_the_demo_run_and_says_by_how_much",
    "test_distributed_demo_run_merges_the_workers_ledgers",
    "test_a_chaos_run_records_its_profile_and_faults_and_the_report_shows_them",
]
# Left out of the selection. test_hostile_html_is_linear has a wall-clock bound, which mutmut's
# trampolines (every call of a mutated module goes through one) make it miss on the clean code.
# test_mutated_mail_never_raises (300 generated mails, 9 s) would run for each of Message's
# mutants; it asserts only that nothing raises, which the corpus and the other property tests do too.
DESELECTED = ["test_hostile_html_is_linear", "test_mutated_mail_never_raises"]
TIMEOUT_MULTIPLIER = 2.0
TIMEOUT_CONSTANT = 5.0

# Surviving mutants that are kept, one line each: why no test can (or should) fail on them.
# Keys are mutmut's mutant names (``mutmut show NAME`` prints the diff).
NOTES: dict[str, str] = {
    # gates: a measured value's "why" is never shown (only a subject with no value has one)
    "mailproof.load.gates.x__flow_value__mutmut_16": "equivalent: the why of a measured latency is never read",
    "mailproof.load.gates.x__flow_value__mutmut_25": "equivalent: the why of a measured failure rate is never read",
    "mailproof.load.gates.x__flow_value__mutmut_39": "equivalent: the why of a measured failure count is never read",
    "mailproof.load.gates.x__flow_value__mutmut_45": "equivalent: the why of a measured 0 (ran, expected no email) is never read",
    "mailproof.load.gates.x__flow_value__mutmut_53": "equivalent: the why of a measured count is never read",
    "mailproof.load.gates.x_evaluate__mutmut_32": "equivalent: the why of the run's unexpected count is never read",
    "mailproof.load.gates.x_evaluate__mutmut_43": "equivalent: the why of the HTTP error rate is never read",
    "mailproof.load.gates.x_evaluate__mutmut_51": "equivalent: the why of the harness error count is never read",
    # latency
    "mailproof.load.latency.xǁLatencyHistogramsǁrecord__mutmut_12":
        "equivalent below resolution: 1 ppm more, under the histogram's 0.1 %; exact only below 2 ms, where it is < 0.002 µs",
    "mailproof.load.latency.xǁLatencyHistogramsǁencode__mutmut_3": "equivalent: codec names are case-insensitive",
    "mailproof.load.latency.xǁLatencyHistogramsǁmerge__mutmut_5": "equivalent: codec names are case-insensitive",
    # ledger
    "mailproof.load.ledger.xǁLedgerǁon_arrival__mutmut_6":
        "equivalent: a message without recipients is counted unparsed before its subject is used",
    "mailproof.load.ledger.xǁLedgerǁon_arrival__mutmut_9":
        "equivalent: a message without recipients is counted unparsed before its subject is used",
    "mailproof.load.ledger.xǁLedgerǁon_arrival__mutmut_12":
        "equivalent: a message without recipients is counted unparsed before its Message-ID is used",
    "mailproof.load.ledger.xǁLedgerǁon_arrival__mutmut_44":
        "equivalent: the notify_all at the top of the lock already wakes settle() on every arrival",
    "mailproof.load.ledger.xǁLedgerǁsettle__mutmut_19": "equivalent: left is a float difference, exactly 0 only by chance",
    "mailproof.load.ledger.xǁLedgerǁsettle__mutmut_20":
        "timing only: ends the quiet period early in the last second; a test would need a timed straggler",
    "mailproof.load.ledger.xǁLedgerǁsettle__mutmut_21": "equivalent: silent is a float difference, equal to quiet only by chance",
    "mailproof.load.ledger.xǁLedgerǁsettle__mutmut_28":
        "timing only: sleeps longer within the quiet period, still bounded by the deadline",
    "mailproof.load.ledger.xǁLedgerǁ_satisfied__mutmut_3":
        "equivalent: called only for addresses with an expectation; one not awaited owes nothing either way",
    "mailproof.load.ledger.xǁLedgerǁ_satisfied__mutmut_7":
        "equivalent: callers ask only about awaited expectations (record_flow, and addresses in _outstanding)",
    "mailproof.load.ledger.xǁLedgerǁlost_addresses__mutmut_4":
        "equivalent: the account of an expectation not awaited owes nothing",
    "mailproof.load.ledger.xǁLedgerǁlost_addresses__mutmut_15":
        "equivalent: an unknown trigger sorts first as 0.0 or 1.0, triggers being epoch seconds",
    "mailproof.load.ledger.xǁLedgerǁreconcile__mutmut_151":
        "equivalent: an unknown trigger sorts first as 0.0 or 1.0, triggers being epoch seconds",
    "mailproof.load.ledger.xǁLedgerǁrecord_flow__mutmut_24":
        "equivalent: replies are keyed by trigger times, never by None, so get(None) is None too",
    "mailproof.load.ledger.xǁLedgerǁrecord_flow__mutmut_37":
        "equivalent: Expectation.reply is read only past the end of replies, which has one per expected email",
    "mailproof.load.ledger.xǁLedgerǁrecord_flow__mutmut_47":
        "equivalent: Expectation.reply is read only past the end of replies, which has one per expected email",
    "mailproof.load.ledger.xǁLedgerǁrecord_flow__mutmut_55":
        "equivalent: Expectation.reply is read only past the end of replies, which has one per expected email",
    "mailproof.load.ledger.xǁLedgerǁ_awaited__mutmut_2":
        "equivalent: an expectation of 0 emails has no slots, so awaiting it owes and delivers nothing",
    "mailproof.load.ledger.xǁLedgerǁ_account__mutmut_86":
        "equivalent: every reader of account.owed first checks that the expectation is awaited",
    # mailbox
    "mailproof.mailbox.xǁMailboxǁ_verdict__mutmut_38":
        "equivalent: with a recipient there is no resolved map, and stamp() then uses the trigger either way",
    "mailproof.mailbox.xǁMailboxǁ__init____mutmut_22": "equivalent: None and False are both false for `if not self._closed`",
    "mailproof.mailbox.xǁMailboxǁaddress__mutmut_2": "equivalent: AddressBook lower-cases labels, so 'USER' is 'user'",
    # criteria
    "mailproof.criteria.xǁCriteriaǁ_mismatches__mutmut_11":
        "only a sender= of 'xxxx' could tell: an empty MAIL FROM is compared as '' (or 'XXXX') and matches no real sender",
    # message
    "mailproof.message.xǁAttachmentǁtext__mutmut_10":
        "equivalent: with no charset and no default decode_bytes reads UTF-8 anyway (an unusable charset is read as UTF-8)",
    "mailproof.message.xǁAttachmentǁtext__mutmut_14": "equivalent: an unknown default charset is read as UTF-8, the default",
    "mailproof.message.xǁAttachmentǁtext__mutmut_15": "equivalent: codec names are case-insensitive",
    "mailproof.message.xǁMessageǁ__init____mutmut_11": "equivalent: codec names are case-insensitive",
    "mailproof.message.xǁMessageǁ_header_value__mutmut_1": "equivalent: the cache of decoded headers missed, same value decoded again",
    "mailproof.message.xǁMessageǁ_header_value__mutmut_2": "equivalent: the cache of decoded headers missed, same value decoded again",
    "mailproof.mailbox.xǁMailboxǁon_request__mutmut_18":
        "equivalent: a harness-error kind is only a key for logging once; any name distinct from the others does",
    "mailproof.mailbox.xǁMailboxǁon_request__mutmut_19":
        "equivalent: a harness-error kind is only a key for logging once; any name distinct from the others does",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_55":
        "equivalent: a harness-error kind is only a key for logging once; any name distinct from the others does",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_56":
        "equivalent: a harness-error kind is only a key for logging once; any name distinct from the others does",
    "mailproof.mailbox.xǁ_Expectingǁ__init____mutmut_11": "equivalent: None and False are both false for `if self._entered`",
    "mailproof.mailbox.xǁ_Expectingǁ__enter____mutmut_13":
        "equivalent: without a recipient the previous expectation is never restored (`if key:`)",
    "mailproof.mailbox.xǁ_Expectingǁ__exit____mutmut_7":
        "equivalent: __enter__ always set expected[key], so pop() without a default finds it",
    "mailproof.mailbox.xǁ_Expectingǁ__exit____mutmut_30":
        "equivalent: returning True only matters with an exception, and that path returns False earlier",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_34":
        "equivalent: narrowing the candidates by recipient is for speed; the criteria check the recipient too",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_36":
        "equivalent: narrowing the candidates by recipient is for speed; the criteria check the recipient too",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_41": "equivalent: the probe only calls matches(), which ignores count",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_42": "equivalent: the probe only calls matches(), which ignores exclude",
    "mailproof.mailbox.xǁ_Expectingǁ_finish__mutmut_46": "equivalent: the probe only calls matches(), which ignores count",
}

SURVIVED = ("survived", "no tests", "suspicious")  # counted against the share


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items) + "]"


def prepare(fresh: bool, modules: list[str]) -> None:
    if fresh and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    for name in ("mailproof", "tests"):
        link = WORK / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    selection = list(TESTS)
    for name in END_TO_END:
        selection += ["--deselect", f"tests/test_rehearsal.py::{name}"]
    selection += ["-k", " and ".join(f"not {name}" for name in DESELECTED)]
    config = (ROOT / "pyproject.toml").read_text()
    assert "[tool.mutmut]" not in config, "the mutmut settings live in benchmarks/mutation.py"
    config += (
        "\n\n# Added by benchmarks/mutation.py\n[tool.mutmut]\n"
        f'source_paths = ["mailproof"]\n'
        f"only_mutate = {toml_list(modules)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(selection)}\n"
        f'pytest_add_cli_args = ["-p", "no:cacheprovider"]\n'
        f"timeout_multiplier = {TIMEOUT_MULTIPLIER}\n"
        f"timeout_constant = {TIMEOUT_CONSTANT}\n"
        "use_git_change_detection = false\n"
    )
    target = WORK / "pyproject.toml"
    if not target.exists() or target.read_text() != config:
        target.write_text(config)


def mutmut(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        sys.exit(f"mutmut is not installed in {sys.prefix}: pip install -e '.[mutation]'")
    return subprocess.run([str(exe), *args], cwd=WORK, text=True, capture_output=capture)


def results() -> dict[str, str]:
    """mutant name -> status, from ``mutmut results --all true``."""
    proc = mutmut("results", "--all", "true", capture=True)
    if proc.returncode:
        sys.exit(f"mutmut results failed:\n{proc.stdout}\n{proc.stderr}")
    found = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s+(\S+): (.+)$", line)
        if m:
            found[m[1]] = m[2].strip()
    return found


def module_of(name: str) -> str:
    # mailproof.load.ledger.xǁLedgerǁ_account__mutmut_3 / mailproof.criteria.x__text_matches__mutmut_1
    return name.split(".x")[0] if ".x" in name else name.rsplit(".", 1)[0]


def report(statuses: dict[str, str], max_share: float, runtime: float | None, show_diffs: bool) -> int:
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in statuses.items():
        per_module[module_of(name)][status] += 1
    columns = ["killed", "survived", "no tests", "timeout", "not checked"]

    def row(label: str, counts: Counter) -> str:
        cells = [counts.get(c, 0) for c in columns]
        other = sum(counts.values()) - sum(cells)
        checked = sum(counts.values()) - counts.get("not checked", 0)
        bad = sum(counts.get(s, 0) for s in SURVIVED)
        share = 100 * bad / checked if checked else 0.0
        return (f"{label:<26}{sum(counts.values()):>8}" + "".join(f"{v:>12}" for v in cells)
                + f"{other:>7}{share:>10.1f} %")

    print(f"{'module':<26}{'mutants':>8}" + "".join(f"{c:>12}" for c in columns) + f"{'other':>7}{'survived':>12}")
    overall: Counter = Counter()
    for module in sorted(per_module):
        print(row(module, per_module[module]))
        overall.update(per_module[module])
    print(row("total", overall))
    checked = sum(overall.values()) - overall.get("not checked", 0)
    bad = sorted(n for n, s in statuses.items() if s in SURVIVED)
    share = len(bad) / checked if checked else 1.0
    print(f"\nsurvivor share: {len(bad)} of {checked} checked = {100 * share:.1f} % (at most {100 * max_share:.0f} %; "
          "'no tests' counts as survived, a timeout as killed)")
    if runtime is not None:
        print(f"runtime: {runtime:.0f} s")
    unexplained = [n for n in bad if n not in NOTES]
    if bad:
        print("\nsurvivors:")
        for name in bad:
            print(f"  {name} [{statuses[name]}]: {NOTES.get(name, 'NO NOTE: kill it with a test or explain it')}")
            if show_diffs and name not in NOTES:
                diff = mutmut("show", name, capture=True).stdout
                print("    " + "\n    ".join(line for line in diff.splitlines()[3:] if line[:1] in "+-"))
    stale = sorted(set(NOTES) - set(bad))
    if stale:
        print(f"\n{len(stale)} notes name no survivor (killed now, or renumbered): {', '.join(stale)}")
    problems = []
    if overall.get("not checked"):
        problems.append(f"{overall['not checked']} mutants not checked (an interrupted run?)")
    if share > max_share:
        problems.append("too many survivors")
    if unexplained:
        problems.append(f"{len(unexplained)} survivors without a note")
    print("\nPASS" if not problems else "\nFAIL: " + "; ".join(problems))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="mutmut globs, e.g. 'mailproof.criteria*' (default: all)")
    parser.add_argument("--fresh", action="store_true", help="forget the previous run's results")
    parser.add_argument("--report", action="store_true", help="only print the last run's results")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-share", type=float, default=0.10)
    parser.add_argument("--message-parts", action="store_true", help="also mutate " + ", ".join(MESSAGE_PARTS))
    parser.add_argument("--diffs", action="store_true", help="print the diff of each survivor without a note")
    args = parser.parse_args(argv)
    if os.nice(0) < 10:
        os.nice(10 - os.nice(0))  # the machine is shared; mutants run for minutes
    prepare(args.fresh, MODULES + (MESSAGE_PARTS if args.message_parts else []))
    runtime = None
    if not args.report:
        started = time.monotonic()
        proc = mutmut("run", "--max-children", str(args.max_children), *args.mutants)
        runtime = time.monotonic() - started
        if proc.returncode:
            print(f"mutmut run exited {proc.returncode}", file=sys.stderr)
            return proc.returncode
    return report(results(), args.max_share, runtime, args.diffs)


if __name__ == "__main__":
    sys.exit(main())
