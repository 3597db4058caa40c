import sys

from icbd.cli import main

sys.exit(main())
