"""The one plug-point loader: "module:function" strings from the config -> checked callables.

Plug-points are `typing.Protocol`s (`miles.reward.types.RewardFn`, `miles.rollout.types.DynamicFilter`).
A recipe names an implementation as "package.module:function"; `validate_plugins` imports every one
when the config is parsed and reports all problems in one ConfigError, so a typo fails at submit
time instead of hours into a job. Checks: the module imports, the attribute exists (else the
module's public callables are listed), it is callable and not a class or coroutine function, and
it can be called with exactly the Protocol's positional arguments.

    fns = resolve_plugins(cfg)
    reward = fns["reward.fn"]; dynamic_filter = fns.get("rollout.dynamic_filter")
"""

import difflib
import importlib
import inspect
import logging
from typing import Any, Callable

from miles.errors import ConfigError
from miles.reward.types import RewardFn
from miles.rollout.types import DynamicFilter

logger = logging.getLogger(__name__)

PLUGIN_FIELDS: dict[str, type] = {
    "reward.fn": RewardFn,
    "rollout.dynamic_filter": DynamicFilter,
}
"""Dotted config field -> the Protocol its "module:function" must implement."""
REQUIRED_PLUGINS: frozenset[str] = frozenset({"reward.fn"})
"""Plug-points that must be set; for the others the empty string means "unset"."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _protocol_signature(protocol: type) -> inspect.Signature:
    """The Protocol's __call__ signature without self."""
    sig = inspect.signature(protocol.__call__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _public_callables(module: Any) -> list[str]:
    return sorted(
        name for name, value in vars(module).items()
        if not name.startswith("_") and callable(value) and not inspect.ismodule(value)
    )


def _check_arity(fn: Callable, protocol: type, where: str) -> None:
    """ConfigError unless fn can be called with exactly the Protocol's positional arguments."""
    expected = _protocol_signature(protocol)
    num_args = sum(1 for p in expected.parameters.values() if p.kind in _POSITIONAL)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        logger.debug("%s: no inspectable signature; arity not checked", where)
        return
    params = list(sig.parameters.values())
    num_required = sum(1 for p in params if p.kind in _POSITIONAL and p.default is p.empty)
    num_positional = sum(1 for p in params if p.kind in _POSITIONAL)
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty]
    if num_required <= num_args and (varargs or num_positional >= num_args) and not kw_required:
        return
    raise ConfigError(
        f"{where}: signature {sig} does not match {protocol.__name__}{expected}: it must take "
        f"{num_args} positional argument(s)"
        + (f" and no required keyword-only arguments ({', '.join(kw_required)})" if kw_required else "")
    )


def load_plugin(path: str, protocol: type, field: str) -> Callable:
    """Import "module:function" named by config field `field` and check it against `protocol`.

    Raises ConfigError naming the field and path for a malformed path, a failed import, a missing
    or non-callable attribute, or a signature that does not fit the Protocol's __call__.
    """
    where = f"{field}={path!r}"
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr or module_name.startswith(".") or ":" in attr or "." in attr:
        raise ConfigError(
            f"{where}: expected \"package.module:function\" (a module-level callable implementing {protocol.__name__})"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        public = _public_callables(module)
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(
            f"{where}: module {module_name!r} has no attribute {attr!r}{hint} "
            f"Its public callables: {', '.join(public) or '(none)'}"
        )
    fn = getattr(module, attr)
    if inspect.isclass(fn):
        raise ConfigError(f"{where}: {attr} is a class; name a function (or a module-level instance with __call__)")
    if not callable(fn):
        raise ConfigError(f"{where}: {attr} is a {type(fn).__name__}, not callable")
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        raise ConfigError(f"{where}: {attr} is async; {protocol.__name__} is called synchronously")
    _check_arity(fn, protocol, where)
    return fn


def _get_dotted(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate_plugins(cfg: Any) -> dict[str, Callable]:
    """Load every plug-point of cfg; raise one ConfigError listing all problems, else return them.

    The result maps dotted field -> callable, for the plug-points that are set.
    """
    resolved: dict[str, Callable] = {}
    errors: list[str] = []
    for field, protocol in PLUGIN_FIELDS.items():
        path = _get_dotted(cfg, field)
        if not path:
            if field in REQUIRED_PLUGINS:
                errors.append(f"{field} is required: a \"package.module:function\" implementing {protocol.__name__}")
            continue
        try:
            resolved[field] = load_plugin(path, protocol, field)
        except ConfigError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} plug-point errors:\n  " + "\n  ".join(errors))
    return resolved


def resolve_plugins(cfg: Any) -> dict[str, Callable]:
    """The plug-point callables of a config for runtime use (validated exactly as at parse time)."""
    return validate_plugins(cfg)
