import sys

from spf.cli.main import main

sys.exit(main())
