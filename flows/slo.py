"""Delivery SLOs: seconds from the triggering request to the email being accepted by the relay."""

TRANSACTIONAL = 5.0  # confirmations, reset codes, receipts
BULK = 15.0  # newsletters go through the same outbox behind any backlog
NO_MAIL_WINDOW = 1.0  # how long a negative check waits for mail that must not come
