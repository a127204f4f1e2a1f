"""``python -m ultraedit.cli``: the same as the ``ultraedit`` command."""
import sys

from . import main

sys.exit(main())
