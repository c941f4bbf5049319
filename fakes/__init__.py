"""Stand-ins for third-party services the demo application calls (the email-validation API).

Run from the repository, never installed: the wheel holds the ``mailproof`` package only. Only
stdlib and third-party imports here.
"""
