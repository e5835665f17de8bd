"""``python -m mechscope``: the ``mechscope`` command."""

from mechscope.cli.main import main

main()
