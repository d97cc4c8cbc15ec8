"""README's commands run as written: every Python block, and every `diffenv sample / train / ab` command and the
tiny-model setup lines of its bash blocks and of its text, with only the sizes made small (`--n`, `--images`,
`--eval-images`) and the outputs written to a temporary folder. Not run here: `compare` (tests/test_compare.py
runs it on a quick config), the GPU check and the RL Zoo (tests/test_examples.py, tests/test_sb3.py), `torchrun`
(tests/test_distributed.py) and lines with a `...` placeholder."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RUNS = ("diffenv sample", "diffenv train", "diffenv ab", "python -m diffenv.models.tiny", "printf ")
#: the sizes a command runs with here: flag -> largest value kept
SMALL = {"--n": 4, "--images": 64, "--eval-images": 16}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(RUNS) and "..." not in line]


def inline_commands() -> list[str]:
    """`diffenv sample|ab ...` spans of the prose (they may wrap over lines)."""
    spans = re.findall(r"`(diffenv (?:sample|ab) [^`]+)`", README)
    return [" ".join(s.split()) for s in spans]


def shrink(command: str) -> str:
    """The command with its sizes capped (`SMALL`); everything else as written."""
    if command.startswith("printf"):
        return command
    words = shlex.split(command)
    for i, w in enumerate(words[:-1]):
        if w in SMALL and int(words[i + 1]) > SMALL[w]:
            words[i + 1] = str(SMALL[w])
        if w in ("--out", "--grid") and words[i + 1].startswith(("docs/", "examples/")):
            words[i + 1] = Path(words[i + 1]).name  # never over a committed file (docs/ is linked in)
    return shlex.join(words)


def run(command: str, cwd: Path, monkeypatch) -> None:
    """One README line in `cwd`: the CLIs in this process (the command line as written, parsed by their own
    parsers; no interpreter start per line), a shell line in a shell."""
    monkeypatch.chdir(cwd)
    if command.startswith("printf"):  # a shell line (a redirect)
        subprocess.run(command, shell=True, check=True, timeout=60)
        return
    words = shlex.split(command)
    if words[0] == "diffenv":
        from agents.cli import main
        argv = words[1:]
    else:
        assert words[:3] == ["python", "-m", "diffenv.models.tiny"], command
        from diffenv.models.tiny import main
        argv = words[3:]
    assert main(argv) == 0, f"README command failed: {command}"


def workdir(tmp_path: Path) -> Path:
    """A folder where README's relative inputs (docs/, examples/) resolve and its outputs land."""
    for name in ("docs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


BASH = [pytest.param(cmds, id=f"bash-block-{i}") for i, b in enumerate(blocks("bash")) if (cmds := commands(b))]


def test_readme_has_the_commands_this_file_runs():
    """The extraction finds what README shows (a README rewrite that drops them should be noticed here)."""
    flat = [c for p in BASH for c in p.values[0]] + inline_commands()
    assert any(c.startswith("diffenv sample --model shapes") for c in flat), flat
    assert any(c.startswith("diffenv train") for c in flat)
    assert any(c.startswith("diffenv ab --model shapes") for c in flat)
    assert shrink("diffenv sample --n 1000 --seed 7") == "diffenv sample --n 4 --seed 7"
    assert shrink("diffenv ab --out docs/results/ab.png") == "diffenv ab --out ab.png"


@pytest.mark.parametrize("cmds", BASH)
def test_readme_bash_block_runs(tmp_path, monkeypatch, cmds):
    cwd = workdir(tmp_path)
    for command in cmds:
        run(shrink(command), cwd, monkeypatch)


@pytest.mark.parametrize("command", inline_commands())
def test_readme_inline_command_runs(tmp_path, monkeypatch, command):
    run(shrink(command), workdir(tmp_path), monkeypatch)


@pytest.mark.parametrize("code", [pytest.param(b, id=f"python-block-{i}") for i, b in enumerate(blocks("python"))])
def test_readme_python_block_runs(tmp_path, monkeypatch, code):
    monkeypatch.chdir(workdir(tmp_path))
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_layout_table_matches_the_tree():
    """Every folder the layout table lists exists, and every package folder and top-level folder is listed."""
    table = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/]+/)` \|", table, flags=re.M))
    assert listed, table
    for folder in listed:
        assert (ROOT / folder).is_dir(), folder
    tracked = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in ("runs", "build", "dist") and not p.name.endswith(".egg-info")}
    subpackages = {f"{p.parent.relative_to(ROOT)}/" for p in ROOT.glob("*/*/__init__.py")}
    assert tracked <= listed, tracked - listed
    assert {s for s in subpackages if not s.startswith("tests/")} <= listed, subpackages - listed
