"""One module per ``moe-local`` command; shared options live in ``options``."""
