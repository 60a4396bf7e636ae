"""Ratchet: every dotted config key with its type and default is pinned in golden/config_keys.txt.

A new, renamed or re-typed key, or a changed default, fails here until the golden file is
regenerated on purpose:  UPDATE_GOLDEN=1 python -m pytest tests/unit/config/test_surface.py
"""

import dataclasses

from miles.config.loader import iter_config_keys
from miles.config.run_config import RunConfig

HEADER = "# dotted key: type = default   (regenerate: UPDATE_GOLDEN=1 pytest tests/unit/config/test_surface.py)\n"


def _surface() -> str:
    return HEADER + "".join(f"{key}: {type_name} = {default!r}\n" for key, type_name, default in iter_config_keys())


def test_config_surface_matches_golden(assert_golden):
    assert_golden("config_keys.txt", _surface())


def test_surface_covers_every_section():
    sections = {line.split(".", 1)[0] for line in _surface().splitlines()[1:]}
    assert sections == {f.name for f in dataclasses.fields(RunConfig)}
