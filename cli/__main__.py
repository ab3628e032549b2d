"""``python -m dbnode.cli``: the same as the ``dbnode`` command."""

import sys

from .main import main

sys.exit(main())
