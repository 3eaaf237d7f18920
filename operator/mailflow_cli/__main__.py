"""``python -m mailflow_cli``: the same as the ``mailflow`` command."""

import sys

from mailflow_cli.main import main

sys.exit(main())
