"""Checking a table of a TOML file against a schema: one-line errors naming the file and the key.

``check_table(table, schema, where)`` with ``schema = {key: (type or types, required)}`` raises
:class:`SchemaError` for an unknown key, a wrong type (a bool is never an int here) or a missing
required key. Target profiles (``harness.targets``) and each backend's own option table
(``harness.backends``) use it.
"""

from __future__ import annotations


class SchemaError(ValueError):
    """A table that does not match its schema (one line)."""


def type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
             "dict": "a table", "bool": "true or false"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


def check_table(table: dict, schema: dict, where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise SchemaError(f"{where}: unknown key '{key}' (valid: {', '.join(schema) or 'none'})")
        types = schema[key][0]
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types:  # bool is an int in Python, not here
            raise SchemaError(f"{where}: key '{key}' must be {type_name(types)}, got bool")
        if not isinstance(value, types):
            raise SchemaError(f"{where}: key '{key}' must be {type_name(types)}, got {type(value).__name__}")
    for key, (_, required) in schema.items():
        if required and key not in table:
            raise SchemaError(f"{where}: missing required key '{key}'")
