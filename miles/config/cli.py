"""Print the fully resolved config of a recipe plus overrides, as YAML.

    python -m miles.config.cli --recipe quickstart rollout.temperature=0.7 --trainer.lr=1e-6

Every key is printed, with defaults and derived batch sizes, exactly as it would be written to
the run directory. Bad input (unknown key, wrong type, batch sizes, plug-points) exits with
status 2 and the ConfigError message on stderr, without a traceback.
"""

import argparse
import logging
import sys
from typing import Sequence

from miles.config.loader import available_recipes, config_to_yaml, load_config
from miles.errors import ConfigError

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options; every argument not listed here is an override `section.key=value`."""
    parser = argparse.ArgumentParser(
        prog="python -m miles.config.cli",
        description="Print the resolved Miles config (recipe + overrides) as YAML.",
        epilog="Overrides: section.key=value or --section.key=value, applied left to right after the recipe.",
        allow_abbrev=False,
    )
    parser.add_argument("--recipe", help="recipe name (configs/<name>.yaml, $MILES_CONFIG_DIR) or path to a YAML file")
    parser.add_argument("--list-recipes", action="store_true", help="print the known recipe names and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = build_parser().parse_known_args(argv)
    if args.list_recipes:
        sys.stdout.write("".join(f"{name}\n" for name in available_recipes()))
        return 0
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_CONFIG_ERROR
    sys.stdout.write(config_to_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
