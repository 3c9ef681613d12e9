"""``python -m p2pacs``."""

from __future__ import annotations

import sys

from p2pacs.cli import main

sys.exit(main())
