"""Optional features and the extra that installs each: a missing one fails with the fix.

The core (``pip install mailproof``) is what the pytest path needs. Load, IMAP and reports are
extras, so that a pytest user does not get Locust's gevent patching or matplotlib.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mailproof.errors import MailproofError

# import name -> (distribution, extra)
EXTRAS = {
    "imap_tools": ("imap-tools", "imap"),
    "locust": ("locust", "load"),
    "gevent": ("gevent", "load"),
    "hdrh": ("hdrhistogram", "load"),
    "allure": ("allure-pytest", "report"),
    "allure_commons": ("allure-pytest", "report"),
    "matplotlib": ("matplotlib", "report"),
    "jinja2": ("jinja2", "report"),
    "nh3": ("nh3", "report"),
    "tinycss2": ("tinycss2", "report"),
    "trustme": ("trustme", "tls"),
    "dkim": ("dkimpy", "checks"),
    "aiospamc": ("aiospamc", "checks"),
}


class MissingExtra(MailproofError, ImportError):
    """A feature's optional dependency is not installed; the message names the extra."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or fail naming ``pip install 'mailproof[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        dist, extra = EXTRAS.get(top, (top, "all"))
        raise MissingExtra(
            f"{feature} needs {dist}, which is not installed ({exc}). "
            f"Install it with: pip install 'mailproof[{extra}]'") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it twice for nothing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
