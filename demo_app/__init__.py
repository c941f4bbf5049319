"""Demo Shop: the reference application under test.

A small aiohttp service that sends mail the way products do (templates, an outbox with a worker
pool, SMTP retries, a third-party validation API). It stands for someone else's product, so it
imports nothing of the harness and talks to it only over HTTP and SMTP.
"""
