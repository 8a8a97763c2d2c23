"""``python -m trimode.runtime.serving triton-repo|serve ...``: the serving subcommands of the ``trimode``
command line alone (``runtime.cli.serve.main``). This file belongs to the cli wing: the serving modules never
import the command line."""

import sys

from trimode.runtime.cli.serve import main

sys.exit(main())
