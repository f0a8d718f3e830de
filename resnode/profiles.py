"""Parameters and run profiles of the chapters.

Profiles: ``smoke`` (seconds, for tests), ``book`` (the built book), ``paper`` (the source's scale).
A chapter's ``parameters`` cell declares its parameters with type annotations (papermill reads them); its
first code cell calls :func:`parameters` on its globals, which refuses names papermill injected that the
chapter does not declare, and coerces the strings that ``papermill -p`` passes ("false", "16,32") to the
declared types. :func:`settings` then merges the profile's values with the parameters given: a parameter
left at ``None`` takes the profile's value.
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Mapping
from types import SimpleNamespace

from . import _checks

__all__ = ["PROFILES", "parameters", "settings"]

PROFILES = ("smoke", "book", "paper")

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _coerce(name: str, value, kind):
    """``value`` as the annotated type ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list``, ``list[T]``,
    ``X | None``). ``None`` (or the string "None") is accepted for every type: it means "the profile's value"."""
    if value is None or (isinstance(value, str) and value.strip() == "None"):
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, option)
            except TypeError:
                continue
        raise TypeError(f"parameter {name!r} must be {_describe(kind)}; got {value!r}")
    if origin in (list, tuple) or kind in (list, tuple):
        origin = origin or kind
        if isinstance(value, str):
            text = value.strip()
            try:
                value = ast.literal_eval(text if text.startswith(("[", "(")) else f"[{text}]")
            except (ValueError, SyntaxError):
                raise TypeError(f"parameter {name!r} must be {_describe(kind)}, e.g. 16,32,64; got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else typing.Any
        return origin(_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value))
    if kind is typing.Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(f"parameter {name!r} must be a bool (true/false, yes/no, 1/0); got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(f"parameter {name!r} must be an int; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        if hasattr(value, "__index__"):  # numpy integers
            return int(value)
        raise TypeError(f"parameter {name!r} must be an int; got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(f"parameter {name!r} must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"parameter {name!r} must be a number; got {value!r}") from None
    if kind is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"parameter {name!r} must be a string; got {value!r}")
    return value


def _describe(kind) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def parameters(namespace: dict) -> dict:
    """Validate a chapter's parameters in its globals ``namespace``, in place, and return them as a dict.

    The declared parameters are the annotated names of the ``parameters`` cell (``__annotations__``). Any other
    plain value in the namespace at this point was injected by papermill (or set by hand) under a name the
    chapter does not know: it is refused, with the list of known names. Values are coerced to their declared
    type, so ``-p image_runs false`` gives ``False`` and ``-p depths 16,32`` gives ``[16, 32]``; a value that
    cannot be coerced is refused with the expected type. ``profile`` must be one of ``PROFILES``.
    """
    declared = dict(namespace.get("__annotations__", {}))
    if "profile" not in declared:
        raise ValueError("a chapter's parameters cell must declare `profile: str`")
    hidden = set()
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            hidden = set(shell.user_ns_hidden)
    except ImportError:
        pass
    plain = (bool, int, float, str, list, tuple, dict, type(None))
    unknown = sorted(k for k, v in namespace.items()
                     if not k.startswith("_") and k not in declared and k not in hidden and isinstance(v, plain))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; this chapter's parameters are: "
                         f"{', '.join(declared)}")
    values = {}
    for name, kind in declared.items():
        if name not in namespace:
            raise ValueError(f"parameter {name!r} is declared but has no value")
        values[name] = namespace[name] = _coerce(name, namespace[name], kind)
    _checks.one_of("profile", values["profile"], PROFILES)
    return values


def settings(profile_or_parameters, smoke: dict, book: dict, paper: dict) -> SimpleNamespace:
    """The settings of a profile; each profile must name the same settings.

    ``profile_or_parameters`` is a profile name, or the dict of :func:`parameters`: then its ``profile`` chooses
    the profile, every parameter is a setting too, and a parameter that names a setting overrides the profile's
    value unless it is ``None``.
    """
    given = dict(profile_or_parameters) if isinstance(profile_or_parameters, Mapping) else {"profile": profile_or_parameters}
    profile = _checks.one_of("profile", given["profile"], PROFILES)
    keys = set(smoke)
    if set(book) != keys or set(paper) != keys:
        raise ValueError(f"profiles name different settings: {sorted(set(smoke) ^ set(book) | set(smoke) ^ set(paper))}")
    chosen = dict({"smoke": smoke, "book": book, "paper": paper}[profile])
    for name, value in given.items():
        if name in chosen and value is None:
            continue
        chosen[name] = value
    return SimpleNamespace(**chosen)
