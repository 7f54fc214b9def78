"""One reader for ``KEY=VALUE`` settings, shared by every command and the notebook runner.

``-p clahe=false``, ``--set epochs=3``, ``--preprocess lung_crop=true`` and ``--option
attention=none`` all go through :func:`parse_assignments`: a value reads as a boolean (``true`` /
``false`` in any case, so Python's ``False`` works too), a number, a list (``[0, 1]`` or ``0,1``
where a list is expected) or a TOML/Python literal, and otherwise as plain text.  ``none`` is
the text "none" for a setting that holds text (``scheduler=none``, ``attention=none``) and "no
value" (None) for any other (``min_age=none``).  When
the caller knows what each key holds (a *schema*: key -> example value or type), an unknown key
stops with the closest known names and a value of the wrong type stops naming the key, the
expected type and the value given, before any work starts.  ``bool("false")`` is ``True``;
nothing here calls it.
"""

from __future__ import annotations

import ast
import difflib
import tomllib
from typing import Any, Iterable, Mapping, Sequence
from data_prep.errors import WorkbookError

#: Words that mean "no value" for a setting that does not hold text (min_age=none).
NONE_WORDS = ("none", "null")
#: What a schema may say a key holds: one of these types, or ``(list, element type or None)``.
SCALAR_TYPES = (bool, int, float, str, dict)


class AssignmentError(WorkbookError, ValueError):
    """A ``KEY=VALUE`` item is malformed, names an unknown key, or has a value of the wrong type."""


def parse_value(raw: str) -> Any:
    """Read one value as typed on a command line: booleans, ``none``, numbers, lists, quoted
    strings and inline tables (TOML, or a Python literal), else the text itself."""
    text = raw.strip()
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower in NONE_WORDS:
        return text  # "none" is a real value of text settings (scheduler, attention); see check_value
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, tuple) else value


def expected_type(example: Any) -> Any:
    """The schema entry for a setting whose current or default value is ``example``
    (``None`` when it says nothing: then any value passes)."""
    if isinstance(example, type) or isinstance(example, tuple):
        return example
    if isinstance(example, (list, tuple)):
        inner = {expected_type(v) for v in example}
        return (list, inner.pop() if len(inner) == 1 else None)
    for kind in SCALAR_TYPES:
        if isinstance(example, kind):
            return kind
    return None


def type_name(expected: Any) -> str:
    """Human words for a schema entry: ``an integer``, ``a list of numbers``, ..."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a text", dict: "a table {k = v}"}
    if isinstance(expected, tuple):
        inner = expected[1]
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "texts"}
        return f"a list of {plural[inner]}" if inner in plural else "a list"
    return names.get(expected, "any value")


def check_value(key: str, value: Any, expected: Any, raw: str | None = None) -> Any:
    """Return ``value`` converted to ``expected`` where that loses nothing (an integer where a
    number is expected, a scalar where a list is), else raise :class:`AssignmentError` naming
    ``key``, the expected type and the value given.  ``None`` always passes (it means: the default),
    and so do the words ``none``/``null`` for a setting that does not hold text."""
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS and expected not in (str, None) \
            and not (isinstance(expected, tuple) and expected[1] is str):
        return None
    if value is None or expected is None:
        return value
    given = repr(raw) if raw is not None else repr(value)

    def fail() -> AssignmentError:
        return AssignmentError(f"{key} must be {type_name(expected)}, got {given}")

    if isinstance(expected, tuple):
        inner = expected[1]
        if not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return [check_value(key, v, inner) for v in value]
        except AssignmentError:
            raise fail() from None
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if expected is str:
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (list, dict)):
            return raw.strip()  # `model=123`, `device=0`: the text as typed
        raise fail()
    if expected is dict:
        if isinstance(value, dict):
            return value
        raise fail()
    return value


def unknown_key_message(key: str, known: Iterable[str], what: str) -> str:
    """One line for a key that is not in ``known``: the closest matches, else every known key."""
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
    return f"{key!r} is not {what}; {hint}"


def parse_assignments(
    items: Sequence[str], schema: Mapping[str, Any] | None = None, what: str = "a known setting",
    flag: str = "--set",
) -> dict[str, Any]:
    """Turn ``["epochs=3", "pretrained=false"]`` into ``{"epochs": 3, "pretrained": False}``.

    ``schema`` (key -> example value or type; see :func:`expected_type`) checks each key and
    value; without one every key passes and values are only parsed.  Raises
    :class:`AssignmentError` for an item without ``=``, an unknown key (naming close matches) or
    a value of the wrong type (naming the key, the expected type and the value given).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise AssignmentError(f"{flag} expects KEY=VALUE, got {item!r}")
        if schema is None:
            out[key] = parse_value(raw)
            continue
        if key not in schema:
            raise AssignmentError(f"{flag} {unknown_key_message(key, schema, what)}")
        expected = expected_type(schema[key])
        text = raw.strip()
        if isinstance(expected, tuple) and not text.startswith(("[", "(")) and "," in text:
            value: Any = [parse_value(part) for part in text.split(",")]
        else:
            value = parse_value(raw)
            if isinstance(expected, tuple) and isinstance(value, str) and text[:1] in "[(" and text[-1:] in "])":
                # [PA] or [cbam, clahe]: bare words in brackets, which TOML and Python both refuse
                value = [parse_value(part) for part in text[1:-1].split(",") if part.strip()]
        out[key] = check_value(key, value, expected, raw)
    return out


def check_fields(values: Mapping[str, Any], schema: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Check already-typed ``values`` (from Python, a notebook or a TOML file) against ``schema``,
    as :func:`parse_assignments` does for text; unknown keys are left to the caller."""
    out = {}
    for key, value in values.items():
        if key in schema:
            try:
                out[key] = check_value(key, value, expected_type(schema[key]))
            except AssignmentError as err:
                raise AssignmentError(f"{owner}.{err}") from None
        else:
            out[key] = value
    return out
