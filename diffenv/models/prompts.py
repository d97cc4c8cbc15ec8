"""Prompt sets: the condition set of a text-to-image backend (condition id i = prompt i).

A prompt set is a list of strings or a UTF-8 text file with one prompt per line; blank lines and
lines starting with ``#`` are skipped, surrounding whitespace is stripped. Order is kept (it defines
the condition ids) and duplicates are errors, since two ids for one prompt would split its groups.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence


def load_prompts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """A prompt set as a list of non-empty strings; see the module docstring for the file format."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; expected a text file with one "
                                    f"prompt per line (or pass a list of prompts)")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
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
