"""``python -m trimode.runtime.cli`` (torchrun launches it this way)."""

import sys

from trimode.runtime.cli.main import main

sys.exit(main())
