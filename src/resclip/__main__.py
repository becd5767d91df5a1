"""``python -m resclip``: the same as the ``resclip`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
