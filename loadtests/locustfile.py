"""The demo's launch-day locustfile, for running Locust by hand (e.g. distributed over machines).

`make rehearsal` does not need it: it runs `mailproof rehearse -f loadtests/flows.py`. By hand:
    locust -f loadtests/locustfile.py --headless --host URL --mailproof-sink-url URL --stop-timeout 30 \
        [--shape burst --peak-rate 20 --duration 60] [--flow-mix 'signup_confirms_account=3,...']
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # flows/ and loadtests/ as packages

from locust import constant_pacing, events  # noqa: E402

from loadtests import flows as demo  # noqa: E402
from loadtests.shapes import RehearsalShape, add_options  # noqa: E402,F401  (Locust picks up the shape)
from mailproof.load import FlowUser, tasks_for  # noqa: E402
from mailproof.load.flows import FlowsError, load_flows  # noqa: E402

LOADED = load_flows(demo.__name__)
DEFAULT_MIX = LOADED.mix()


class LaunchDayUser(FlowUser):
    flows = DEFAULT_MIX
    wait_time = constant_pacing(1.0)  # without --shape (-u/-r/-t); a shape sets the arrivals itself


@events.init_command_line_parser.add_listener
def _shape_options(parser) -> None:
    add_options(parser)
    parser.add_argument("--flow-mix", default="",
                        help="weights, e.g. 'signup_confirms_account=3,order_receipt=1' (default: launch-day mix)")


@events.test_start.add_listener
def _apply_mix(environment, **_kw) -> None:
    text = environment.parsed_options.flow_mix if environment.parsed_options else ""
    if text:
        try:
            LaunchDayUser.tasks = tasks_for(LOADED.mix(text))
        except FlowsError as exc:
            raise SystemExit(f"mailproof: {exc}") from None
