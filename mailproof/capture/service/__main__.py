"""``python -m mailproof.capture.service ...``: see ``mailproof.capture.service.cli``."""

import sys

from mailproof.capture.service.cli import main

if __name__ == "__main__":
    sys.exit(main())
