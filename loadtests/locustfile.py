"""The nightly rehearsal: the flows of flows/ as Locust tasks against the demo app.

Run through `make rehearsal` (loadtests/rehearse.py starts the sink service and the app). By hand:
    locust -f loadtests/locustfile.py --headless --host URL --mailproof-sink-url URL --stop-timeout 30
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # flows/ and loadtests/ as packages

from locust import constant_pacing, events  # noqa: E402

from flows import accounts, newsletter, orders  # noqa: E402
from loadtests.shapes import RehearsalShape, add_options  # noqa: E402,F401  (Locust picks up the shape)
from mailproof.load import FlowUser, tasks_for  # noqa: E402

# Launch-day mix: mostly signups, then receipts and resets; newsletters are rare per user.
DEFAULT_MIX = {
    accounts.signup_confirms_account: 6,
    orders.order_receipt: 3,
    accounts.password_reset_code_works_once: 2,
    newsletter.newsletter_one_click_unsubscribe: 1,
}
FLOWS_BY_NAME = {fn.__name__: fn for fn in DEFAULT_MIX}


class LaunchDayUser(FlowUser):
    flows = DEFAULT_MIX
    wait_time = constant_pacing(1.0)  # each user starts a flow every second: arrival rate = users/s


@events.init_command_line_parser.add_listener
def _shape_options(parser) -> None:
    add_options(parser)
    parser.add_argument("--flow-mix", default="",
                        help="weights, e.g. 'signup_confirms_account=3,order_receipt=1' (default: launch-day mix)")


@events.test_start.add_listener
def _apply_mix(environment, **_kw) -> None:
    text = environment.parsed_options.flow_mix if environment.parsed_options else ""
    if not text:
        return
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in FLOWS_BY_NAME:
            raise SystemExit(f"unknown flow {name.strip()!r} in --flow-mix; choose from {', '.join(FLOWS_BY_NAME)}")
        mix[FLOWS_BY_NAME[name.strip()]] = int(weight or 1)
    LaunchDayUser.tasks = tasks_for(mix)
