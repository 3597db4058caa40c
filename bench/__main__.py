"""`python -m bench [--quick] [--out DIR] [--only NAMES]`: the same as `icbd bench`."""

import sys

from icbd.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
