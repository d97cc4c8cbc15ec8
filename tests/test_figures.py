"""Every figure the project writes is legible shown at 1,200 px wide (diffenv/viz.py, diffenv/ab.py,
agents/benchmark/report.py): its size, its aspect ratio and the size its smallest text has there."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from diffenv.viz import FIGURE_WIDTH, FONT_PX, MIN_TEXT_PX, grid_figure, save_grid

matplotlib.use("Agg")
#: width / height bounds: no ribbon of one row or one column (the old A/B figure was 524 × 5,640 px)
ASPECT = (1 / 2.5, 3.5)
PROMPT = "a cyan square left of a yellow circle"


def check_picture(width: int, height: int) -> None:
    """A PIL picture: drawn for FIGURE_WIDTH (so FONT_PX stays >= MIN_TEXT_PX when shown at it), sensible aspect."""
    assert FIGURE_WIDTH <= width <= 1.2 * FIGURE_WIDTH, width
    assert FONT_PX * FIGURE_WIDTH / width >= MIN_TEXT_PX
    assert ASPECT[0] <= width / height <= ASPECT[1], (width, height)


@pytest.mark.parametrize("n, captions", [(64, False), (100, True), (20, True), (1, True)])
def test_sample_and_training_grids(tmp_path, n, captions):
    images = torch.rand(n, 3 if captions else 1, 32 if captions else 8, 32 if captions else 8)
    path = save_grid(images, tmp_path / "g.png", nrow=10 if n > 64 else None,
                     captions=[PROMPT] * n if captions else None)
    check_picture(*Image.open(path).size)


def test_ab_figure_is_a_grid_of_prompts_by_sides(tmp_path):
    from diffenv.ab import save_ab_figure

    prompts, seeds = [PROMPT] * 10, [0, 1]
    a = SimpleNamespace(model="shapes", lora="runs/x/lora_1024.safetensors", num_steps=20, seeds=seeds,
                        reward=["shapes_verifier", "shapes_judge"], out=str(tmp_path / "ab.png"))
    base, tuned = torch.rand(20, 3, 32, 32), torch.rand(20, 3, 32, 32)
    sides = [("base+CFG(w=5)", base, 40, 1.0), ("LoRA(w=1)", tuned, 20, 0.5)]
    scores = [[torch.rand(20), torch.rand(20)] for _ in sides]
    width, height = Image.open(save_ab_figure(a, prompts, sides, scores)).size
    check_picture(width, height)
    assert height < width  # 10 prompt columns, 4 rows: wider than tall, unlike the old 20-row column


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved while the test runs: (name, width px, height px, smallest text in px once the
    picture is shown FIGURE_WIDTH px wide)."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    saved, real = [], Figure.savefig

    def savefig(fig, path, *args, dpi=None, **kwargs):
        dpi = dpi or fig.dpi
        width, height = fig.get_figwidth() * dpi, fig.get_figheight() * dpi
        sizes = [t.get_fontsize() * dpi / 72 * FIGURE_WIDTH / width for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text().strip()]
        saved.append((str(path).rsplit("/", 1)[-1], round(width), round(height), min(sizes)))
        return real(fig, path, *args, dpi=dpi, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.parametrize("n_tasks", [1, 3])
def test_comparison_plots(tmp_path, monkeypatch, saved_figures, n_tasks):
    from agents.benchmark import report
    from agents.benchmark.compare import Task

    tasks = [Task(name=f"task{i}", model="digits-flow" if i else "shapes", num_steps=3, algos=["grpo", "fdfo"],
                  seeds=[0, 1], budgets=[64, 128], cfg_scales=[1.0, 2.0, 5.0]) for i in range(n_tasks)]
    agg, probe_rows = [], []
    for task in tasks:
        protocol = report.task_protocol(task.model)
        for algo in task.algos:
            for seed in task.seeds:
                run = tmp_path / "runs" / task.name / algo / f"seed{seed}"
                run.mkdir(parents=True)
                with (run / "log.csv").open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["images_seen", "reward_mean", "probe_judge_accuracy", f"probe_{protocol.diversity}"])
                    w.writerows([[64 * i, 0.5 + 0.1 * i, 0.5 + 0.05 * i, 30 - i] for i in range(1, 5)])
        for w in task.cfg_scales:
            row = {"task": task.name, "entry": f"cfg w={w:g}", "kind": "cfg", "guidance_scale": w, "algo": "",
                   "nfe_per_image": 3 * (1 + (w > 1)), "judge_accuracy": 0.5 + w / 20, protocol.diversity: 30 - w}
            agg.append(row)
            probe_rows.append(dict(row, kind="cfg_probe"))
        for algo in task.algos:
            for kind, budget in (("rl", 64), ("rl", 128), ("selected", 128)):
                agg.append({"task": task.name, "entry": f"{algo} @{budget}", "kind": kind, "algo": algo,
                            "budget": budget, "guidance_scale": 1.0, "nfe_per_image": 3, "judge_accuracy": 0.7,
                            protocol.diversity: 20.0})
    images = torch.rand(20, 3, 32, 32)
    monkeypatch.setattr(report, "eval_model", lambda task, model, w: SimpleNamespace(
        images=images if task.model == "shapes" else images[:, :1, :8, :8], prompts=[PROMPT] * 20))
    report.plot_training_curves(tasks, tmp_path)
    report.plot_probe_curves(tasks, tmp_path, probe_rows)
    report.plot_frontier(agg, tasks, tmp_path)
    report.plot_grids(agg, tasks, tmp_path)
    names = {name for name, *_ in saved_figures}
    assert {"reward_vs_images.png", "frontier.png", "curves_task0.png", "grids_task0.png"} <= names
    for name, width, height, smallest in saved_figures:
        assert width >= FIGURE_WIDTH and smallest >= MIN_TEXT_PX, (name, width, smallest)
        assert ASPECT[0] <= width / height <= ASPECT[1], (name, width, height)
        assert Image.open(tmp_path / name).size == (width, height)


def test_grid_figure_checks_its_text_counts():
    with pytest.raises(ValueError, match="expected 4"):
        grid_figure(torch.rand(4, 1, 8, 8), captions=["x"] * 3)
    picture = grid_figure(torch.rand(6, 1, 8, 8), ncol=3, col_labels=["a"] * 3, row_labels=["r1", "r2"], title="t")
    assert picture.dtype == np.uint8 and picture.shape[1] >= FIGURE_WIDTH
