"""Failures a flow can raise. Assertion errors, so pytest reports them as test failures."""


class MailproofError(Exception):
    """The harness itself is misconfigured or broken (not a product failure)."""


class MailNotDelivered(AssertionError):
    """An expected email did not arrive in time."""


class MailLate(AssertionError):
    """An expected email arrived, but later than its bound."""


class UnexpectedMail(AssertionError):
    """An email arrived where none was expected."""
