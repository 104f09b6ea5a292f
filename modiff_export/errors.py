"""User-facing errors: the CLI turns any of these into one line on stderr and exit code 1.

`Fields` reads a JSON object field by field so that every problem in a file is such one line, naming the file
and the field (the manifest and the typed pieces it holds: ModelInfo, ScaleTable, ...)."""


class ModiffExportError(Exception):
    """Base class for every error caused by bad input (files, options, tensors, state)."""


class FieldError(ModiffExportError):
    """A JSON field that is missing or of the wrong type (callers pass their own subclass)."""


class Fields:
    """Typed access to one JSON object; every problem raises `error` with one line naming the file and field."""

    def __init__(self, d, where: str, source: str, error: type[Exception] = FieldError):
        if not isinstance(d, dict):
            raise error(f"{source}: {where or 'manifest'} must be a JSON object, got {type(d).__name__}")
        self.d, self.where, self.source, self.error = d, where, source, error

    def fail(self, key: str, what: str):
        raise self.error(f"{self.source}: {self.where + '.' if self.where else ''}{key} {what}")

    def get(self, key: str, types, optional: bool = False):
        if key not in self.d:
            if optional:
                return None
            self.fail(key, "is missing")
        v = self.d[key]
        if v is None and optional:
            return None
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            self.fail(key, f"must be {type_names(types)}, got {v!r}")
        if not isinstance(v, types):
            self.fail(key, f"must be {type_names(types)}, got {type(v).__name__} {str(v)[:40]!r}")
        return v

    def choice(self, key: str, allowed, optional: bool = False) -> str | None:
        v = self.get(key, str, optional)
        if v is None and optional:
            return None
        if v not in allowed:
            self.fail(key, f"is {v!r}, expected one of {list(allowed)}")
        return v

    def sub(self, key: str, optional: bool = False) -> "Fields | None":
        v = self.get(key, dict, optional)
        return None if v is None else Fields(v, f"{self.where}.{key}" if self.where else key, self.source, self.error)

    def items(self, key: str, optional: bool = False) -> list["Fields"]:
        v = self.get(key, list, optional) or []
        return [Fields(x, f"{self.where + '.' if self.where else ''}{key}[{i}]", self.source, self.error)
                for i, x in enumerate(v)]


def type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
                        bool: "true/false", type(None): "null"}.get(t, t.__name__) for t in types)
