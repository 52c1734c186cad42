"""``python -m moe_local`` is ``moe-local``."""

from .cli import main

main()
