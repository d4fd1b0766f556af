"""`python -m megatron_bolt.cli ...` is the `bolt` command."""

import sys

from megatron_bolt.cli import main

# Guarded: checkpoint writers start worker processes with "spawn", which re-imports __main__.
if __name__ == "__main__":
    sys.exit(main())
