"""The digits data set shipped with scikit-learn, split once for every model in the repo.

All embedded models (the two diffusion models, the reward classifier and the judge) train on the
*train* split only; held-out numbers in README come from the *test* split. Pixels are scaled from
scikit-learn's 0..16 to [-1, 1] (diffusion space); `to_unit` maps back to the [0, 1] images rewards see.
"""

from __future__ import annotations

import torch

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(images [N, 1, 8, 8] float32 in [-1, 1], labels [N] int64)` for `split`.

    The split is stratified and seeded (`SPLIT_SEED`), so every script sees the same rows.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = split_indices(split, digits.target)  # checks `split`
    x, y = digits.images[rows], digits.target[rows]
    images = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(y, dtype=torch.long)


def split_indices(split: str = "train", targets=None):
    """Row indices (numpy int array, in the split's order) of `split` in scikit-learn's `load_digits()`.

    Lets a model record exactly which digits it saw (e.g. `digit_judge_indep` trains on the test split only).
    `targets`: `load_digits().target` when the caller has it already (it is read from disk otherwise).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    import numpy as np
    from sklearn.model_selection import train_test_split

    if targets is None:
        from sklearn.datasets import load_digits

        targets = load_digits().target
    rows = np.arange(len(targets))
    if split == "all":
        return rows
    train, test = train_test_split(rows, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=targets)
    return train if split == "train" else test


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map diffusion-space pixels in [-1, 1] to images in [0, 1] (clamped)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
