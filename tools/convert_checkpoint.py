#!/usr/bin/env python
"""Megatron-LM-style entry point: same as `bolt convert {hf-to-mcore,mcore-to-hf}` (see `--help`).

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out CKPT [--tp N --pp M]
    python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT --out DIR
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_bolt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
