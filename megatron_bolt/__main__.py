import sys

from megatron_bolt.cli import main

sys.exit(main())
