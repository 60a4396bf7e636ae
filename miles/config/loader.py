"""Strict YAML recipes + dotted overrides -> `RunConfig`, and the resolved-config dump.

    cfg = load_config("quickstart", ["rollout.temperature=0.7", "--trainer.lr=1e-6"])
    write_resolved_config(cfg, run_dir(cfg))   # run_dir/config.yaml; load_config(that path) == cfg

A recipe is a name, looked up as `<name>.yaml` in each folder of $MILES_CONFIG_DIR (os.pathsep-
separated) and then in the repository's `configs/`, or a path to a YAML file. Parsing is strict:
an unknown key, a value of the wrong type, a duplicate key or a YAML syntax error is a
`ConfigError` naming the file and line. Booleans are only true/false (never yes/no/on/off or
0/1); floats may be written `1e-6`; an int is accepted where a float is expected.

Overrides `section.key=value` (a leading `--` is allowed) are applied after the recipe, left to
right; the value is parsed as YAML, and an empty value sets a str field to "". Every plug-point
is imported and checked (`miles.config.plugins.validate_plugins`) before `load_config` returns.
See docs/config.md.
"""

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Sequence

import yaml

from miles.config.plugins import validate_plugins
from miles.atomic_file import atomic_write_text
from miles.config.run_config import RunConfig
from miles.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_DIR_ENV = "MILES_CONFIG_DIR"
"""Environment variable: extra folders (os.pathsep-separated) searched for recipes before configs/."""
RESOLVED_CONFIG_NAME = "config.yaml"
"""File name of the resolved config inside a run directory."""

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_STRICT_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
# YAML 1.1 (PyYAML) reads 1e-6 as a string because its float pattern requires a dot.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _resolvers(base: dict, *, keep_yaml11_bool: bool) -> dict:
    """A copy of PyYAML's implicit resolvers with exponent floats, and optionally strict booleans."""
    out = {ch: [(tag, rx) for tag, rx in entries if keep_yaml11_bool or tag != _BOOL_TAG] for ch, entries in base.items()}
    extra = [(_FLOAT_TAG, _EXP_FLOAT, "-+0123456789")]
    if not keep_yaml11_bool:
        extra.append((_BOOL_TAG, _STRICT_BOOL, "tTfF"))
    for tag, regexp, first_chars in extra:
        for ch in first_chars:
            out.setdefault(ch, []).append((tag, regexp))
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader reading only true/false as booleans ("yes" stays a string) and 1e-6 as a float."""

    yaml_implicit_resolvers = _resolvers(yaml.SafeLoader.yaml_implicit_resolvers, keep_yaml11_bool=False)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes any string which _Loader or a plain YAML 1.1 reader would not read as a string."""

    yaml_implicit_resolvers = _resolvers(yaml.SafeDumper.yaml_implicit_resolvers, keep_yaml11_bool=True)


# ---------------------------------------------------------------- schema (from the dataclasses)


@cache
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Init fields of a config dataclass: name -> (resolved annotation, Field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    """Human name of a field annotation: int, float | None, list of str, ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "None" if tp is type(None) else tp.__name__


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether value fits annotation tp (strictly), and the value converted to it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, None
    if origin is tuple:
        args = typing.get_args(tp)
        assert len(args) == 2 and args[1] is Ellipsis, f"unsupported config annotation {tp}"
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_matches(item, args[0]) for item in value]
        return all(ok for ok, _ in items), tuple(item for _, item in items)
    if tp is type(None):
        return value is None, None
    if tp is float:
        return type(value) in (int, float), float(value) if type(value) in (int, float) else None
    assert tp in (int, str, bool), f"unsupported config annotation {tp}"
    return type(value) is tp, value


def _check_value(value: Any, tp: Any, dotted: str, where: str) -> Any:
    """The value converted to the field's type, or a ConfigError naming where, key, type and value."""
    ok, converted = _matches(value, tp)
    if ok:
        return converted
    hint = ""
    if tp is str and isinstance(value, (int, float, bool)):
        hint = " (quote it to pass a string)"
    shown = f"{value!r} ({type(value).__name__})" if value is not None else "null"
    raise ConfigError(f"{where}: {dotted}: expected {_type_name(tp)}, got {shown}{hint}")


def _unknown_key(where: str, parts: list[str], index: int, cls: type) -> ConfigError:
    """Error for parts[index], not a field of cls: the dotted key, a close match, and the valid keys."""
    section, key = ".".join(parts[:index]), parts[index]
    valid = list(_fields(cls))
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {'.'.join(parts[:index] + close + parts[index + 1:])!r}?" if close else "."
    return ConfigError(
        f"{where}: unknown key {'.'.join(parts)!r}{hint} Valid keys of {section or 'the top level'}: {', '.join(valid)}"
    )


def iter_config_keys(cls: type = RunConfig, prefix: str = "") -> typing.Iterator[tuple[str, str, Any]]:
    """Every leaf config key as (dotted key, type name, default), in declaration order."""
    for name, (tp, f) in _fields(cls).items():
        if _is_section(tp):
            yield from iter_config_keys(tp, f"{prefix}{name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield f"{prefix}{name}", _type_name(tp), default


# ---------------------------------------------------------------- recipes


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if p]
    return [*extra, Path(__file__).resolve().parents[2] / "configs"]


def available_recipes() -> list[str]:
    """Names of the recipes found in the search folders ($MILES_CONFIG_DIR, then configs/)."""
    names = {p.stem for d in _search_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def resolve_recipe(recipe: str | Path) -> Path:
    """The YAML file of a recipe name or path; ConfigError if there is none."""
    text = str(recipe)
    is_path = isinstance(recipe, Path) or "/" in text or os.sep in text or text.endswith((".yaml", ".yml"))
    if is_path:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {text!r} does not exist")
        return path
    for folder in _search_dirs():
        path = folder / f"{text}.yaml"
        if path.is_file():
            return path
    names = available_recipes()
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    searched = ", ".join(str(d) for d in _search_dirs())
    raise ConfigError(f"no recipe named {text!r}{hint} Known recipes: {', '.join(names) or '(none)'} (searched {searched})")


def _read_recipe(path: Path) -> dict:
    """The recipe at path as a checked tree of {field: value or sub-tree}."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e}") from e
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}:1: the recipe is empty; expected a mapping of sections ({', '.join(_fields(RunConfig))})")
        return _read_mapping(node, RunConfig, "", path, loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        detail = ", ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(f"{path}{line}: invalid YAML: {detail}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    finally:
        loader.dispose()


def _read_mapping(node: yaml.Node, cls: type, section: str, path: Path, loader: _Loader) -> dict:
    """Check a YAML mapping node against dataclass cls, key by key, with file:line in every error."""
    where = f"{path}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and section:
        return {}  # "rollout:" with every key commented out
    if not isinstance(node, yaml.MappingNode):
        what = f"section {section!r}" if section else "the recipe"
        raise ConfigError(f"{where}: {what} must be a mapping of keys ({', '.join(_fields(cls))}), got {node.id}")
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        key = str(key_node.value)
        dotted = f"{section}.{key}" if section else key
        if key not in _fields(cls):
            parts = [*section.split("."), key] if section else [key]
            raise _unknown_key(where, parts, len(parts) - 1, cls)
        if key in out:
            raise ConfigError(f"{where}: duplicate key {dotted!r}")
        tp = _fields(cls)[key][0]
        if _is_section(tp):
            out[key] = _read_mapping(value_node, tp, dotted, path, loader)
        else:
            value = loader.construct_object(value_node, deep=True)
            out[key] = _check_value(value, tp, dotted, f"{path}:{value_node.start_mark.line + 1}")
    return out


# ---------------------------------------------------------------- overrides


def _apply_override(tree: dict, text: str) -> None:
    """Set one `section.key=value` override into the tree, checking key and type."""
    where = f"override {text!r}"
    body = text[2:] if text.startswith("--") else text
    dotted, sep, raw = body.partition("=")
    dotted = dotted.strip()
    if not sep:
        raise ConfigError(
            f"{where}: expected KEY=VALUE with a dotted key, e.g. rollout.temperature=0.7 "
            f"(sections: {', '.join(_fields(RunConfig))})"
        )
    parts = dotted.split(".")
    cls, node = RunConfig, tree
    for i, part in enumerate(parts):
        if part not in _fields(cls):
            raise _unknown_key(where, parts, i, cls)
        tp = _fields(cls)[part][0]
        is_last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if _is_section(tp) and is_last:
            keys = list(_fields(tp))
            raise ConfigError(f"{where}: {here} is a section; set one of its keys ({here}.{keys[0]}=...). Valid keys of {here}: {', '.join(keys)}")
        if not _is_section(tp) and not is_last:
            raise ConfigError(f"{where}: {here} is a {_type_name(tp)} value, not a section")
        if not is_last:
            cls, node = tp, node.setdefault(part, {})
            continue
        if raw.strip() == "" and tp is str:
            node[part] = ""
            return
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: value {raw!r} is not valid YAML: {getattr(e, 'problem', e)}") from e
        node[part] = _check_value(value, tp, dotted, where)


# ---------------------------------------------------------------- building and dumping


def _build(cls: type, tree: dict) -> Any:
    """Instantiate cls from a checked tree; __post_init__ errors surface as ConfigError, message intact."""
    kwargs = {}
    for name, (tp, _) in _fields(cls).items():
        if name in tree:
            kwargs[name] = _build(tp, tree[name]) if _is_section(tp) else tree[name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a recipe (name or path; None = all defaults), apply overrides, build and validate the config.

    Raises ConfigError for any bad key, type, value, batch-size combination or plug-point.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    source = resolve_recipe(recipe) if recipe is not None else None
    tree = _read_recipe(source) if source is not None else {}
    for text in overrides:
        _apply_override(tree, text)
    cfg = _build(RunConfig, tree)
    validate_plugins(cfg)
    logger.debug("loaded config from %s with %d override(s)", source or "defaults", len(overrides))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists/scalars, every field included, in declaration order."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML that load_config reads back to an equal RunConfig."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def run_dir(cfg: RunConfig) -> Path:
    """The run directory: run.output_dir / run.name."""
    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"run.name={name!r} must be a non-empty folder name without path separators")
    return Path(cfg.run.output_dir) / name


def write_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write run_dir/config.yaml (every key, defaults and derived sizes) atomically; return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RESOLVED_CONFIG_NAME
    header = "# Resolved Miles config: every key, with defaults and derived batch sizes.\n"
    header += f"# Reload with miles.config.loader.load_config({str(target)!r}).\n"
    atomic_write_text(target, header + config_to_yaml(cfg))
    logger.info("wrote resolved config %s", target)
    return target
