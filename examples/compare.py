"""The RL-vs-CFG benchmark: `python examples/compare.py [--quick] [--config examples/compare.toml] [--out runs/compare]`.

Same as `diffenv compare`: CFG sweep and best-of-N on the base model against every configured
diffusion-RL algorithm sampled guidance-free, on reward, held-out judge, diversity (FD, within-class
variance), NFE and wall time per image. Interrupted runs resume from `--out`.
"""

import sys
from pathlib import Path

from agents.cli import main

if __name__ == "__main__":
    here = Path(__file__).parent
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", str(here / "compare.toml"), *args]
    sys.exit(main(["compare", *args]))
