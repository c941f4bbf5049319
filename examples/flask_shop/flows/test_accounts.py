import pytest

from . import accounts


@pytest.mark.parametrize("as_form", [False, True], ids=["json", "form"])
def test_signup_confirms_account(run_flow, as_form):
    run_flow(accounts.signup_confirms_account, as_form=as_form)


def test_tampered_confirmation_link_is_refused(run_flow):
    run_flow(accounts.tampered_confirmation_link_is_refused)


def test_password_reset_code_works_once(run_flow):
    run_flow(accounts.password_reset_code_works_once)


def test_password_reset_unknown_address_sends_nothing(run_flow):
    run_flow(accounts.password_reset_unknown_address_sends_nothing)
