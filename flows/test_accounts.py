import pytest

from flows import accounts


def test_signup_confirms_account(run_flow):
    run_flow(accounts.signup_confirms_account)


def test_password_reset_code_works_once(run_flow):
    run_flow(accounts.password_reset_code_works_once)


@pytest.mark.parametrize("bad_address", [
    "ada.lovelace@@example.test",
    "ada lovelace@example.test",
    "no-at-sign.example.test",
    "@example.test",
    "ada@",
    "ada@localhost",
])
def test_signup_rejects_malformed_address(run_flow, bad_address):
    run_flow(accounts.signup_rejects_malformed_address, bad_address=bad_address)


def test_signup_rejects_undeliverable_address(run_flow):
    run_flow(accounts.signup_rejects_undeliverable_address)


def test_password_reset_unknown_address_sends_nothing(run_flow):
    run_flow(accounts.password_reset_unknown_address_sends_nothing)
