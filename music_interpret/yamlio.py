"""Reading ``pipeline.yaml`` and applying ``--set`` overrides, before any typing.

A safe YAML loader that also reads ``1e-3`` as a number (YAML 1.2's rule), a guard
against documents that expand through aliases (or refer to themselves), ``--set``
values typed the way YAML types a scalar, and ``KEY.PATH=VALUE`` / ``list[INDEX]``
overrides of the raw mapping. Every problem is a one-line :class:`UserError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

_KEY_PART_RE = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]|(\.)")
MAX_YAML_VALUES = 1_000_000  # values a document may expand to through aliases


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error is a one-line UserError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a YAML file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                        f"at offset {exc.start}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{where}: invalid YAML: {problem}") from None
    check_expanded_size(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {_kind(data)}")
    return data


def check_expanded_size(data: Any, where: str, limit: int = MAX_YAML_VALUES) -> None:
    """Refuse a document whose aliases expand it beyond ``limit`` values, or that refers to itself.

    The loader shares aliased values instead of copying them, but everything downstream
    (fingerprints, the manifest) would expand them: ``a: &a [x, x]``, ``b: &b [*a, *a]``, ...
    grows exponentially. Sizes are counted once per shared value, so the check is linear.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(value: Any) -> int:
        key = id(value)
        if key in sizes:
            return sizes[key]
        if not isinstance(value, (dict, list)):
            return 1
        if key in active:
            raise UserError(f"{where}: a YAML alias refers to the value that contains it")
        active.add(key)
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total = 1
        for item in items:
            total += size(item)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(data)
    except RecursionError:
        raise UserError(f"{where}: the YAML document is nested too deeply") from None
    if total > limit:
        raise UserError(f"{where}: the YAML document expands to more than {limit:,} values "
                        "through aliases; refusing it")


def parse_scalar(text: str) -> Any:
    """Type a ``--set`` value the way YAML types a scalar (``1e-3`` -> 0.001, ``[1, 2]`` -> list)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text


def _key_parts(assignment: str, key: str) -> list[str | int]:
    """``a.b[0].c`` -> ``['a', 'b', 0, 'c']``."""
    parts: list[str | int] = []
    pos, expect_name = 0, True
    while pos < len(key):
        m = _KEY_PART_RE.match(key, pos)
        if m is None or (m.group(3) and expect_name) or (m.group(1) and not expect_name):
            raise UserError(f"--set {assignment!r}: cannot read the key path at {key[pos:]!r} "
                            "(write section.key, or list[INDEX].key)")
        if m.group(1):
            parts.append(m.group(1))
        elif m.group(2):
            parts.append(int(m.group(2)))
        expect_name = bool(m.group(3))
        pos = m.end()
    if not parts or expect_name or not isinstance(parts[0], str):
        raise UserError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    return parts


def _path_text(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (list items as ``key[0]``) to the raw mapping ``data`` in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    parts = _key_parts(assignment, key.strip())
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = _path_text(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list):
                raise UserError(f"--set {assignment!r}: {_path_text(parts[:i])} is not a list")
            if not -len(node) <= part < len(node):
                raise UserError(f"--set {assignment!r}: {where} does not exist "
                                f"({_path_text(parts[:i])} has {len(node)} item(s))")
        elif not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {_path_text(parts[:i])} is not a mapping")
        if last:
            node[part] = parse_scalar(value)
            return
        child = node[part] if isinstance(part, int) else node.get(part)
        if child is None or isinstance(child, str):
            if isinstance(parts[i + 1], int):
                raise UserError(f"--set {assignment!r}: {where} is not a list")
            # a plugin given by name becomes {name: ...} so that options can be set
            child = {} if child is None else {"name": child}
            node[part] = child
        node = child


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return repr(value)
