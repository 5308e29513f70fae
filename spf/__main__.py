"""``python -m spf`` (and ``torchrun -m spf``): the ``spf`` command line."""

import sys

from spf.cli.main import main

sys.exit(main())
