import sys

from spf.cli import main

sys.exit(main())
