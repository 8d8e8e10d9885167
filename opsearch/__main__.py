import sys

from opsearch.cli import main

sys.exit(main())
