import sys

from dffkit.cli import main

sys.exit(main())
