"""Names that become file or folder names (task names, algorithm names, run names) and paths the user names
(`--out`, `--grid`): one check for each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_FORBIDDEN = ("/", "\\", "\0")
#: bytes in one file or folder name on common file systems (ext4, APFS, NTFS's 255 UTF-16 units)
NAME_MAX = 255
#: a name `safe_name` admits: it is joined with others into one file name (`cache/<task>__<algo>__s<seed>__...json`)
SAFE_NAME_MAX = 100


def brief(value: Any, width: int = 200) -> str:
    """`repr(value)`, its middle cut out when longer than `width` (an error message stays one readable line)."""
    text, half = repr(value), width // 2 - 1
    return text if len(text) <= width else f"{text[:half]}…{text[-half:]} ({len(str(value))} characters)"


def check_path(value: str | os.PathLike, key: str) -> Path:
    """`value` as a Path when every name in it fits a file system (`NAME_MAX` bytes), else a `ValueError` naming
    `key`: an over-long name fails inside the OS (ENAMETOOLONG) at whatever first touches it."""
    for part in Path(value).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ValueError(f"{key}={brief(str(value))}: the name {brief(part, 60)} has {len(os.fsencode(part))} "
                             f"bytes; expected at most {NAME_MAX} bytes per file or folder name")
    return Path(value)


def check_output_file(value: str | os.PathLike, key: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`value` as the path of a file to write (ending in one of `suffixes`, lower case, if any), else a `ValueError`."""
    path = check_path(value, key)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise ValueError(f"{key}={brief(str(value))} is a folder; expected a file name, e.g. {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{key}={brief(str(value))}: expected a file name ending in {' or '.join(suffixes)}")
    return path


def safe_name(value: Any, key: str) -> str:
    """`value` if it is usable as one path component under an output folder, else a `ValueError`.

    Refused: non-strings, the empty name, `.` and `..`, any `/`, `\\` or NUL (so no absolute path and no
    way out of the folder it is joined to), and names over `SAFE_NAME_MAX` bytes. `key` names the setting in the
    error message.
    """
    expected = ("expected a non-empty name without '/', '\\' or NUL, other than '.' and '..', of at most "
                f"{SAFE_NAME_MAX} bytes (it names a folder or file)")
    if not isinstance(value, str):
        raise ValueError(f"{key}={brief(value)} is a {type(value).__name__}; {expected}")
    if value in ("", ".", "..") or any(c in value for c in _FORBIDDEN) or len(value.encode()) > SAFE_NAME_MAX:
        raise ValueError(f"{key}={brief(value)}: {expected}")
    return value
