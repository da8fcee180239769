"""Loading config files and checking `--config.a.b=value` overrides before they are applied.

ml_collections' own parser raises a bare traceback for an unknown key; researchers launching a
sweep need a one-line answer instead: which key is wrong, what the valid keys at that level are,
and the closest match. Types are checked the same way, naming the key and the rejected value.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import pathlib
import sys
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
    """A config file or an override is invalid; the message says what and where."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling its `get_config(arg)`.

    Args:
      spec: a python file path, optionally followed by `:arg` (big_vision convention).

    Returns:
      The (unlocked) ConfigDict the file returns.
    """
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    # Config files import their siblings as `configs.common`: make the repo root importable.
    root = str(file.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_card_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _closest(key: str, valid: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f' Did you mean "{matches[0]}"?' if matches else ""


def _parse_value(path: str, text: str, current: Any) -> Any:
    """Parses `text` to the type of the current value, or raises a ConfigError naming `path`."""
    def fail(kind: str) -> ConfigError:
        return ConfigError(
            f"--config.{path}={text}: expected {kind} (current value {current!r}), got {text!r}"
        )

    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise fail("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise fail("an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise fail("a float") from None
    if isinstance(current, (tuple, list)):
        items = [s.strip() for s in text.strip("()[] ").split(",") if s.strip()]
        if current:
            return tuple(_parse_value(path, item, current[0]) for item in items)
        return tuple(items)
    return text


def resolve_override(config: ml_collections.ConfigDict, dotted: str) -> tuple[Any, str]:
    """Walks `a.b.c` through nested ConfigDicts; returns (parent ConfigDict, last key).

    Raises:
      ConfigError: at the first unknown key, listing the valid keys at that level.
    """
    node = config
    parts = dotted.split(".")
    for depth, key in enumerate(parts):
        where = ".".join(parts[:depth]) or "<top level>"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(
                f"--config.{dotted}: {where} is a value ({node!r}), not a group of keys"
            )
        if key not in node:
            valid = sorted(node.keys())
            raise ConfigError(
                f"--config.{dotted}: unknown key {key!r} in {where}."
                f"{_closest(key, valid)} Valid keys there: {', '.join(valid)}"
            )
        if depth == len(parts) - 1:
            return node, key
        node = node[key]
    raise AssertionError("unreachable")


def set_values(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets `{"a.b.c": value, ...}` in place, each key checked like `--config.a.b.c`
    (a renamed or misspelt key is a ConfigError, never a silently added one)."""
    for dotted, value in values.items():
        parent, key = resolve_override(config, dotted)
        parent[key] = value


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Validates every `--config.x.y=v` in argv against `config` (keys and value types)."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted, sep, text = arg[len("--config."):].partition("=")
        parent, key = resolve_override(config, dotted)
        current = parent[key]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{dotted}: is a group of keys, set one of {sorted(current)}")
        if sep and current is not None:
            _parse_value(dotted, text, current)


def refuse_legacy_keys(config: ml_collections.ConfigDict) -> None:
    """Refuses names from other code bases whose meaning is ambiguous (SPEC §2(d))."""
    flat = to_dict(config)

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if key == "prune_rate":
                raise ConfigError(
                    f"{prefix}{key}: card_jax does not accept 'prune_rate'. In hidden-networks it "
                    "means the fraction KEPT, elsewhere the fraction removed. Use "
                    "'sparsity' = fraction of prunable weights removed (sparsity = 1 - prune_rate "
                    "for hidden-networks/biprop configs)."
                )
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(flat, "")


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A plain, JSON-serialisable dict (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


# Keys added to the configs after workdirs already existed, with the value that reproduces what
# a config without them did. A saved config.json lacking one is read as holding that value (so an
# old run resumes), and sweep names leave them out at that value (so an old sweep keeps its names).
ADDED_KEYS: dict[str, Any] = {
    "train.compute_dtype": "float32",
    "method.level0_from": "",
}


def _parent_of(tree: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict that holds `dotted`'s last component (None if a parent is missing), and it."""
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node.get(name) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def with_added_keys(saved: dict) -> dict:
    """A saved config dict with every ADDED_KEYS entry it lacks filled in (a new dict)."""
    out = json.loads(json.dumps(saved))
    for dotted, value in ADDED_KEYS.items():
        node, leaf = _parent_of(out, dotted)
        if node is not None and leaf not in node:
            node[leaf] = value
    return out


def without_added_defaults(config: dict) -> dict:
    """A config dict minus the ADDED_KEYS entries that hold their backward-compatible value."""
    out = json.loads(json.dumps(config))
    for dotted, value in ADDED_KEYS.items():
        node, leaf = _parent_of(out, dotted)
        if node is not None and leaf in node and node[leaf] == value:
            del node[leaf]
    return out


# Keys that change how a run is evaluated or reported, never what it trains: a resumed or
# finished run may change them (e.g. evaluate on another "-C" set).
VOLATILE_PREFIXES = ("eval.", "train.progress", "train.log_every")


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lists `key: old -> new` for every leaf that differs between two plain config dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def apply_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> ml_collections.ConfigDict:
    """Applies (after checking) every `--config.x.y=v` in argv to `config`, in place."""
    check_overrides(config, argv)
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        dotted, _, text = arg[len("--config."):].partition("=")
        parent, key = resolve_override(config, dotted)
        current = parent[key]
        parent[key] = text if current is None else _parse_value(dotted, text, current)
    return config
