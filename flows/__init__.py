"""The scenarios: plain flow functions, run by pytest (test_*.py here) and by Locust (loadtests/).

Each flow takes one ``flow`` object (``flow.http``, ``flow.mailbox``, ``flow.step``) and asserts
on the emails the demo application sends. Latency bounds are the product's SLOs below.
"""

from flows.accounts import password_reset_code_works_once, signup_confirms_account
from flows.newsletter import newsletter_one_click_unsubscribe
from flows.orders import order_receipt

ALL_FLOWS = [signup_confirms_account, password_reset_code_works_once, order_receipt,
             newsletter_one_click_unsubscribe]

__all__ = ["ALL_FLOWS", "newsletter_one_click_unsubscribe", "order_receipt",
           "password_reset_code_works_once", "signup_confirms_account"]
