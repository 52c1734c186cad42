"""What a non-editable install ships: every package of the source tree, mapped as pyproject says."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).parents[1]


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for top, name in (("moe_local", "moe_local"), ("backends", "moe_local.backends")):
        assert mapping.get(name, name) == top
        for init in (ROOT / top).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert listed == found
