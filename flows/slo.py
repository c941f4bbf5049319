"""Delivery SLOs: seconds from the triggering request to the email being accepted by the relay."""

TRANSACTIONAL = 5.0  # confirmations, reset codes, receipts
BULK = 15.0  # newsletters go through the same outbox behind any backlog
# A negative check first waits for the app's outbox to drain (flows.app.outbox_drained), so this
# window only has to catch a straggler, not a slow send.
NO_MAIL_WINDOW = 0.2
