"""``python -m token_prune.bench``: the same as ``token-prune bench``."""

import sys

from .cli import main

sys.exit(main())
