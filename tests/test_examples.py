"""Every example runs end to end in `--smoke` mode (a subprocess, as a user would run it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["torchrl_ppo_diffusion", "torchrl_ppo_noise", "sb3_ppo_diffusion", "sb3_sac_noise", "cleanrl_style"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_smoke(name):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for when in ("before", "after"):
        match = re.search(rf"reward {when}\s*:\s*([0-9.]+)", proc.stdout)
        assert match, proc.stdout
        assert 0.0 <= float(match.group(1)) <= 1.0


@pytest.mark.parametrize("config", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_compare_config_validates(config):
    """Every shipped `diffenv compare --config` file loads: keys, types, ranges and budgets checked before any work."""
    from agents.benchmark.compare import load_tasks

    tasks = load_tasks(config)
    assert tasks and all(t.seeds and t.budgets and t.eval_images >= 2 for t in tasks)
