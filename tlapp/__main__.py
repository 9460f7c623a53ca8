import sys

from tlapp.cli import run

sys.exit(run())
