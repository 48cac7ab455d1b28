"""``python -m lamin_lightning``: the ``lamin-lightning`` command (``flush``, ``status``)."""

import sys

from lamin_lightning._cli import main

if __name__ == "__main__":
    sys.exit(main())
