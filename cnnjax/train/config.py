"""Loading experiment configs and applying ``--config.field=value`` overrides.

A config file is a Python file with ``get_config() -> ConfigDict`` (the
ml_collections convention). Overrides are parsed by the type of the field they
replace, so ``--config.batch_size=64`` stays an int and
``--config.augment.rotation=10`` a float; a field that does not exist is an
error naming the closest existing fields.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Iterable

import ml_collections


class ConfigError(ValueError):
    """A config file or a config override that cannot be used, in one sentence."""


def default_config() -> ml_collections.ConfigDict:
    """The default experiment (LeNet-5 on digits), importable from the package."""
    from cnnjax.train.defaults import get_config

    return get_config()


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of the Python file at ``path``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass the path of a .py file "
                          "with get_config(), e.g. experiments/configs/lenet5_digits.py.")
    name = "cnnjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file; use a .py file "
                          "with get_config().")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function; define one "
                          "that returns an ml_collections.ConfigDict.")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path!r} returned {type(config).__name__}, "
                          "not an ml_collections.ConfigDict.")
    return config


def _all_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_all_fields(value, prefix + key + "."))
    return names


def _unknown_field(config: ml_collections.ConfigDict, field: str) -> ConfigError:
    close = difflib.get_close_matches(field, _all_fields(config), n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join('--config.' + c for c in close)}?" if close
            else "run `cnnjax train --help` for the config fields.")
    return ConfigError(f"unknown config field --config.{field}; {hint}")


def _parse_value(field: str, text: str, current: object) -> object:
    """Parses ``text`` as a value of the type of ``current``."""
    def fail(kind: str) -> ConfigError:
        return ConfigError(f"--config.{field}={text!r} is not {kind} (the field's current "
                           f"value is {current!r}); give a value of the same type.")

    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise fail("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise fail("an integer") from None
            if as_float.is_integer():
                return int(as_float)
            raise fail("an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise fail("a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            # "30,60,80" without brackets.
            try:
                value = tuple(ast.literal_eval(part) for part in text.split(",") if part.strip())
            except (ValueError, SyntaxError):
                raise fail("a tuple such as (30, 60, 80)") from None
        if isinstance(value, (int, float, str)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise fail("a tuple such as (30, 60, 80)")
        return tuple(value) if isinstance(current, tuple) else list(value)
    # None or another type: a Python literal, else the raw string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets dotted ``field`` of ``config`` from the command-line string ``text``."""
    parts = field.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown_field(config, ".".join(parts[: i + 1]) if child is None else field)
        node = child
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown_field(config, field)
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{field} is a group of fields, not a value; set one of "
                          f"its fields, e.g. --config.{field}.{next(iter(current.keys()), 'x')}"
                          "=...")
    value = _parse_value(field, text, current)
    try:
        with node.unlocked():
            node[leaf] = value
    except TypeError as err:
        raise ConfigError(f"--config.{field}={text!r} has the wrong type: {err}.") from None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
    """Applies ``(field, value_text)`` pairs to a copy of ``config``."""
    config = ml_collections.ConfigDict(config.to_dict())
    for field, text in overrides:
        set_field(config, field, text)
    return config


def split_override_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits ``--config.a.b=v`` / ``--config.a.b v`` out of ``argv``.

    Returns the remaining arguments and the ``(field, value)`` pairs in order.
    """
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                field, text = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                field, text = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} has no value; write {arg}=VALUE.")
            if not field:
                raise ConfigError(f"{arg} names no field; write --config.FIELD=VALUE.")
            overrides.append((field, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
