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

    nice -n 10 .venv/bin/python benchmarks/mutation.py             # about 25 min on 2 cores
    .venv/bin/python benchmarks/mutation.py --report               # the last run's figures only
    .venv/bin/python benchmarks/mutation.py 'mailproof.criteria*'  # one module (mutmut's globs)

Each mutant has a CPU-time limit (RLIMIT_CPU, so a loaded machine does not turn slow into
"timeout"): twice ``(the selected tests' clean time + TIMEOUT_CONSTANT) * TIMEOUT_MULTIPLIER``.
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

MODULES = [
    "mailproof/mailbox.py",
    "mailproof/criteria.py",
    "mailproof/load/ledger.py",
    "mailproof/load/gates.py",
    "mailproof/load/latency.py",
    "mailproof/message.py",
    "mailproof/message_parts.py",
    "mailproof/message_text.py",
    "mailproof/message_html.py",
]

# The unit tests of those modules. test_rehearsal.py's first tests run Locust and the sink
# service as subprocesses (minutes each, and they would not see the mutants): deselected.
TESTS = [
    "tests/test_mailbox.py",
    "tests/test_verdicts.py",
    "tests/test_message.py",
    "tests/test_message_hostile.py",
    "tests/test_rehearsal.py",
] + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_mutants_*.py"))  # written to kill mutants
END_TO_END = [
    "test_flask_shop_rehearsal_runs_exactly_the_users_asked_and_accounts_for_every_email",
    "test_flows_whose_requests_all_get_404_fail_the_run_with_their_failures_and_lose_nothing",
    "test_resent_and_stray_mail_in_a_real_rehearsal_are_duplicated_and_unexpected",
    "test_ten_short_demo_rehearsals_find_no_false_lost_mail",
    "test_an_impossible_gate_fails_the_demo_run_and_says_by_how_much",
    "test_distributed_demo_run_merges_the_workers_ledgers",
    "test_a_chaos_run_records_its_profile_and_faults_and_the_report_shows_them",
]
# Tests with a wall-clock bound: mutmut's trampolines make every call of a mutated module slower,
# so these fail on the clean code in the run (a mutant that makes the parser slow is a timeout).
TIMED = ["test_hostile_html_is_linear"]
TIMEOUT_MULTIPLIER = 2.0
TIMEOUT_CONSTANT = 5.0

# Surviving mutants that are kept, one line each: why no test can (or should) fail on them.
# Keys are mutmut's mutant names (``mutmut show NAME`` prints the diff).
NOTES: dict[str, str] = {
}

SURVIVED = ("survived", "no tests", "suspicious")  # counted against the share


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items) + "]"


def prepare(fresh: bool) -> None:
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
    selection += ["-k", " and ".join(f"not {name}" for name in TIMED)]
    config = (ROOT / "pyproject.toml").read_text()
    assert "[tool.mutmut]" not in config, "the mutmut settings live in benchmarks/mutation.py"
    config += (
        "\n\n# Added by benchmarks/mutation.py\n[tool.mutmut]\n"
        f'source_paths = ["mailproof"]\n'
        f"only_mutate = {toml_list(MODULES)}\n"
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
    columns = ["killed", "survived", "no tests", "timeout", "other"]

    def row(label: str, counts: Counter) -> str:
        known = {c: counts.get(c, 0) for c in columns[:-1]}
        other = sum(counts.values()) - sum(known.values())
        total = sum(counts.values())
        bad = sum(counts.get(s, 0) for s in SURVIVED)
        share = 100 * bad / total if total else 0.0
        cells = [known[c] for c in columns[:-1]] + [other]
        return f"{label:<32}{total:>7}" + "".join(f"{v:>10}" for v in cells) + f"{share:>9.1f} %"

    print(f"{'module':<32}{'mutants':>7}" + "".join(f"{c:>10}" for c in columns) + f"{'survived':>11}")
    overall: Counter = Counter()
    for module in sorted(per_module):
        print(row(module, per_module[module]))
        overall.update(per_module[module])
    print(row("total", overall))
    total = sum(overall.values())
    bad = sorted(n for n, s in statuses.items() if s in SURVIVED)
    share = bad and len(bad) / total or 0.0
    print(f"\nsurvivor share: {len(bad)} of {total} = {100 * share:.1f} % (at most {100 * max_share:.0f} %)")
    if runtime is not None:
        print(f"runtime: {runtime:.0f} s")
    unexplained = [n for n in bad if n not in NOTES]
    if bad:
        print("\nsurvivors:")
        for name in bad:
            print(f"  {name} [{statuses[name]}]: {NOTES.get(name, 'NO NOTE: kill it with a test or explain it')}")
            if show_diffs and name not in NOTES:
                diff = mutmut("show", name, capture=True).stdout
                print("    " + "\n    ".join(line for line in diff.splitlines() if line[:1] in "+-"
                                            and not line.startswith(("+++", "---"))))
    stale = sorted(set(NOTES) - set(bad))
    if stale:
        print(f"\n{len(stale)} notes name no survivor (killed now, or renumbered): {', '.join(stale)}")
    ok = share <= max_share and not unexplained
    print("\nPASS" if ok else f"\nFAIL: {len(unexplained)} survivors without a note" if share <= max_share
          else "\nFAIL: too many survivors")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="mutmut globs, e.g. 'mailproof.criteria*' (default: all)")
    parser.add_argument("--fresh", action="store_true", help="forget the previous run's results")
    parser.add_argument("--report", action="store_true", help="only print the last run's results")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-share", type=float, default=0.10)
    parser.add_argument("--diffs", action="store_true", help="print the diff of each survivor without a note")
    args = parser.parse_args(argv)
    if os.nice(0) < 10:
        os.nice(10 - os.nice(0))  # the machine is shared; mutants run for minutes
    prepare(args.fresh)
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
