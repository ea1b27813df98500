"""``python -m peftkit.serve --model DIR --adapters DIR``: the server without the ``peftkit`` command."""
import argparse
import sys

from .cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m peftkit.serve", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
