"""``python -m peftkit``: the same as the ``peftkit`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
