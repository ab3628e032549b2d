"""``python -m dbnode.cli``: the same as the ``dbnode`` command."""

import sys

from . import main

sys.exit(main())
