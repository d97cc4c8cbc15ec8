"""Prompt sets: the condition set of a text-to-image backend (condition id i = prompt i).

A prompt set is a list of strings or a UTF-8 text file with one prompt per line; blank lines and
lines starting with ``#`` are skipped, surrounding whitespace is stripped. Order is kept (it defines
the condition ids) and duplicates are errors, since two ids for one prompt would split its groups.

A file may name subsets of its prompts with `# split: NAME` lines: every prompt after such a line, up to
the next one, belongs to split NAME (e.g. `train` and `heldout`), which `conditions="heldout"` (or
`--conditions heldout`) then selects. `prompt_splits` reads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

_SPLIT = re.compile(r"#\s*split\s*:\s*(\S+)\s*$")


def load_prompts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """A prompt set as a list of non-empty strings; see the module docstring for the file format."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; expected a text file with one "
                                    f"prompt per line (or pass a list of prompts)")
        lines = [line.strip() for line in _read_lines(path)]
        items = [line for line in lines if line and not line.startswith("#")]
        source = str(path)
    elif isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        items = [p.strip() for p in prompts]
        source = "the prompt list"
        if any(not p for p in items):
            raise ValueError(f"{source} contains an empty prompt; the empty prompt is the null condition "
                             f"(negative_prompt), not a condition")
    else:
        raise TypeError(f"prompts must be a list of strings or a path to a text file, got {type(prompts).__name__}")
    if not items:
        raise ValueError(f"{source} holds no prompts; expected at least one")
    seen: dict[str, int] = {}
    for i, p in enumerate(items):
        if p in seen:
            raise ValueError(f"{source}: prompt {p!r} appears twice (ids {seen[p]} and {i}); expected unique prompts")
        seen[p] = i
    return items


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); expected a text "
                         "file with one prompt per line") from None


def prompt_splits(prompts: str | os.PathLike | Sequence[str]) -> dict[str, list[int]]:
    """Split name → prompt ids, from a prompt file's `# split: NAME` lines ({} for a list or no splits)."""
    if not isinstance(prompts, (str, os.PathLike)):
        return {}
    splits: dict[str, list[int]] = {}
    current, index = None, 0
    for line in _read_lines(Path(prompts).expanduser()):
        line = line.strip()
        if match := _SPLIT.match(line):
            current = splits.setdefault(match.group(1), [])
        elif line and not line.startswith("#"):
            if current is not None:
                current.append(index)
            index += 1
    return {name: ids for name, ids in splits.items() if ids}
