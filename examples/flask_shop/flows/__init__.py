"""Flask Shop's email flows: scenarios (accounts.py, orders.py) and the tests that run them."""
