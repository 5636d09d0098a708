"""``python -m workflows.cli``: the same program as ``wf``."""

from workflows.cli.main import main

main()
