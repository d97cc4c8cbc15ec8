"""Names that become file or folder names (task names, algorithm names, run names): one check for all."""

from __future__ import annotations

from typing import Any

_FORBIDDEN = ("/", "\\", "\0")


def safe_name(value: Any, key: str) -> str:
    """`value` if it is usable as one path component under an output folder, else a `ValueError`.

    Refused: non-strings, the empty name, `.` and `..`, and any `/`, `\\` or NUL (so no absolute path
    and no way out of the folder it is joined to). `key` names the setting in the error message.
    """
    expected = "expected a non-empty name without '/', '\\' or NUL, other than '.' and '..' (it names a folder or file)"
    if not isinstance(value, str):
        raise ValueError(f"{key}={value!r} is a {type(value).__name__}; {expected}")
    if value in ("", ".", "..") or any(c in value for c in _FORBIDDEN):
        raise ValueError(f"{key}={value!r}: {expected}")
    return value
