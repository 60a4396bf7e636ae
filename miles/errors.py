"""Errors that name the user's mistake and the fix.

`ConfigError` covers every bad input found while reading recipes, overrides, data files and
plug-point paths. Internal invariants use `assert`, never this.
"""


class ConfigError(ValueError):
    """A recipe, override, data file or plug-point path is wrong; the message says how to fix it."""
