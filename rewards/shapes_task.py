"""The shapes task: a compositional prompt grammar and an exact renderer (a GenEval analogue at 32×32).

Specification (re-implementable by a third party, and checked by `tests/test_shapes_task.py`):

| item | rule |
|---|---|
| canvas | 32×32 RGB, float in [0, 1], black background; pixel (row i, col j) has its centre at (x, y) = (j + ½, i + ½) |
| colours | red (1,0,0), green (0,1,0), blue (0,0,1), yellow (1,1,0), magenta (1,0,1), cyan (0,1,1), exact, no anti-aliasing |
| bounding box | an axis-aligned square of side s ∈ {7, …, 11} px at integer corner (x0, y0), fully inside the canvas |
| square | every pixel whose centre lies in the box |
| circle | pixel centres within distance s/2 of the box centre (x0 + s/2, y0 + s/2) |
| triangle | isosceles, apex up: apex (x0 + s/2, y0), base from (x0, y0 + s) to (x0 + s, y0 + s); a pixel centre at depth d = y − y0 ∈ [0, s] is inside when |x − x0 − s/2| ≤ d/2 |
| separation | two objects' boxes are ≥ 2 px apart (the gap along x or along y is ≥ 2) |
| relation | `A left of B`: centre_x(A) ≤ centre_x(B) − 4; `right of`: ≥ +4; `above`: centre_y(A) ≤ centre_y(B) − 4 (y grows downwards); `below`: ≥ +4 |

Prompts (1,431 in all), an *object* being a (colour, shape) pair, 18 of them:

| kind | template | count |
|---|---|---|
| `single` | `a {color} {shape}` | 18 |
| `counting` | `two|three {color} {shape}s` (identical colour and shape, sizes drawn independently) | 36 |
| `binding` | `a {c1} {s1} and a {c2} {s2}`, two different objects, in the canonical order (object index of the first < second) | 153 |
| `relation` | `a {c1} {s1} {left of|right of|above|below} a {c2} {s2}`, two different objects, both orders | 1,224 |

Each image contains exactly the objects its prompt names. The held-out split (`split_prompts`) is a
fixed 20 % of the binding and of the relation prompts (seeded permutation), never used in training.
This module is numpy only, so models, rewards and the benchmark share one definition of the task.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from dataclasses import dataclass

import numpy as np

SIZE = 32
COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "magenta": (1, 0, 1),
          "cyan": (0, 1, 1)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "counting", "binding", "relation")
NUMBERS = {"a": 1, "two": 2, "three": 3}
MIN_SIDE, MAX_SIDE, MIN_GAP, MIN_OFFSET = 7, 11, 2, 4
HELDOUT_FRACTION, SPLIT_SEED = 0.2, 0
SPLITS = ("train", "heldout", "all")
#: the objects, in their canonical order: object index = colour index * 3 + shape index
OBJECTS = tuple((c, s) for c in COLORS for s in SHAPES)
#: every word the grammar uses (the text encoder's vocabulary)
WORDS = ("a", "two", "three", "and", "left", "right", "of", "above", "below", *COLORS, *SHAPES,
         *(s + "s" for s in SHAPES))


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: `objects` maps object index -> count; `relation` is (index A, relation, index B) or None."""

    text: str
    kind: str
    objects: tuple[tuple[int, int], ...]  # ((object index, count), ...), in prompt order
    relation: tuple[int, str, int] | None = None


def _name(obj: int) -> str:
    return " ".join(OBJECTS[obj])


def all_prompts() -> list[str]:
    """The 1,431 prompts, in a fixed order (single, counting, binding, relation)."""
    out = [f"a {_name(o)}" for o in range(len(OBJECTS))]
    out += [f"{n} {_name(o)}s" for n in ("two", "three") for o in range(len(OBJECTS))]
    out += [f"a {_name(a)} and a {_name(b)}" for a, b in itertools.combinations(range(len(OBJECTS)), 2)]
    out += [f"a {_name(a)} {rel} a {_name(b)}" for rel in RELATIONS
            for a, b in itertools.permutations(range(len(OBJECTS)), 2)]
    return out


_OBJ = r"(\w+) (\w+)"
_PATTERNS = {
    "single": re.compile(rf"^a {_OBJ}$"),
    "counting": re.compile(rf"^(two|three) {_OBJ}s$"),
    "binding": re.compile(rf"^a {_OBJ} and a {_OBJ}$"),
    "relation": re.compile(rf"^a {_OBJ} (left of|right of|above|below) a {_OBJ}$"),
}


def _object_index(color: str, shape: str, text: str) -> int:
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"prompt {text!r}: {color!r} {shape!r} is not an object of the shapes grammar; expected "
                         f"a colour in {list(COLORS)} and a shape in {list(SHAPES)}")
    return OBJECTS.index((color, shape))


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt of the grammar; ValueError naming the prompt and the expected forms otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    for kind, pattern in _PATTERNS.items():
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        if kind == "single":
            return Prompt(text, kind, ((_object_index(g[0], g[1], text), 1),))
        if kind == "counting":
            return Prompt(text, kind, ((_object_index(g[1], g[2], text), NUMBERS[g[0]]),))
        if kind == "binding":
            a, b = _object_index(g[0], g[1], text), _object_index(g[2], g[3], text)
            if a >= b:
                raise ValueError(f"prompt {text!r}: binding prompts name two different objects in canonical order "
                                 f"(expected {_name(min(a, b))!r} first)" if a != b else
                                 f"prompt {text!r}: binding prompts name two different objects")
            return Prompt(text, kind, ((a, 1), (b, 1)))
        a, b = _object_index(g[0], g[1], text), _object_index(g[3], g[4], text)
        if a == b:
            raise ValueError(f"prompt {text!r}: relation prompts name two different objects")
        return Prompt(text, kind, ((a, 1), (b, 1)), (a, g[2], b))
    raise ValueError(f"prompt {text!r} is not in the shapes grammar; expected one of 'a {{color}} {{shape}}', "
                     f"'two|three {{color}} {{shape}}s', 'a {{c1}} {{s1}} and a {{c2}} {{s2}}', "
                     f"'a {{c1}} {{s1}} left of|right of|above|below a {{c2}} {{s2}}'")


def split_prompts(split: str = "train") -> list[str]:
    """Prompts of a split: `train`, `heldout` (20 % of binding and of relation prompts) or `all`."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes prompt split {split!r}; expected one of {list(SPLITS)}")
    return [p for kind in KINDS for p in _split_by_kind(split)[kind]]  # all_prompts() is kind-major: same order


@lru_cache(maxsize=None)
def _split_by_kind(split: str) -> dict[str, list[str]]:
    """kind -> the split's prompts of that kind, in `all_prompts()` order (computed once: training draws
    prompts every step)."""
    prompts = all_prompts()
    by_kind = {k: [p for p in prompts if parse_prompt(p).kind == k] for k in KINDS}
    if split == "all":
        return by_kind
    rng = np.random.default_rng(SPLIT_SEED)
    held: set[str] = set()
    for kind in ("binding", "relation"):
        group = by_kind[kind]
        n = int(round(HELDOUT_FRACTION * len(group)))
        held.update(group[i] for i in rng.permutation(len(group))[:n])
    return {k: [p for p in group if (p in held) == (split == "heldout")] for k, group in by_kind.items()}


def sample_prompts(n: int, rng: np.random.Generator, split: str = "train") -> list[str]:
    """n prompts of `split`: a kind (of those the split has) uniformly, then a prompt of that kind uniformly
    (relation prompts would otherwise be 86 % of the data)."""
    if split not in SPLITS:
        raise ValueError(f"unknown shapes prompt split {split!r}; expected one of {list(SPLITS)}")
    groups = [g for g in _split_by_kind(split).values() if g]  # `heldout` has no single/counting prompts
    kinds = rng.integers(0, len(groups), n)
    return [groups[k][rng.integers(len(groups[k]))] for k in kinds]


def model_prompts() -> list[str]:
    """The condition set of the embedded `shapes` model: the train split, then the held-out split."""
    return split_prompts("train") + split_prompts("heldout")


#: the evaluation prompt set: (kind, split) -> number of prompts; 50 prompts, so 1,000 images = 20 per prompt
EVAL_GROUPS = {("single", "train"): 10, ("counting", "train"): 10, ("binding", "train"): 5,
               ("binding", "heldout"): 5, ("relation", "train"): 10, ("relation", "heldout"): 10}


def eval_prompts() -> list[str]:
    """A fixed evaluation set spanning every kind, on training and on held-out prompts (`EVAL_GROUPS`), so that
    a benchmark reports accuracy per kind and split and diversity among images of one prompt."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    out: list[str] = []
    for (kind, split), n in EVAL_GROUPS.items():
        group = [p for p in split_prompts(split) if parse_prompt(p).kind == kind]
        out += [group[i] for i in sorted(rng.choice(len(group), n, replace=False))]
    return out


def kind_of(text: str) -> str:
    return parse_prompt(text).kind


# ---------------------------------------------------------------------------------------------- rendering
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres


def shape_mask(shape: str, x0: int, y0: int, side: int) -> np.ndarray:
    """Boolean [32, 32] mask of one shape in the box with corner (x0, y0) and side `side` (module table)."""
    if shape == "square":
        return (_XX >= x0) & (_XX < x0 + side) & (_YY >= y0) & (_YY < y0 + side)
    if shape == "circle":
        return (_XX - x0 - side / 2) ** 2 + (_YY - y0 - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "triangle":
        depth = _YY - y0
        return (depth >= 0) & (depth <= side) & (np.abs(_XX - x0 - side / 2) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def _gap_ok(box: tuple[int, int, int], boxes: list[tuple[int, int, int]]) -> bool:
    x, y, s = box
    for bx, by, bs in boxes:
        gap_x = max(bx - (x + s), x - (bx + bs))
        gap_y = max(by - (y + s), y - (by + bs))
        if max(gap_x, gap_y) < MIN_GAP:
            return False
    return True


def _relation_ok(rel: str, a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    ca = (a[0] + a[2] / 2, a[1] + a[2] / 2)
    cb = (b[0] + b[2] / 2, b[1] + b[2] / 2)
    return {"left of": ca[0] <= cb[0] - MIN_OFFSET, "right of": ca[0] >= cb[0] + MIN_OFFSET,
            "above": ca[1] <= cb[1] - MIN_OFFSET, "below": ca[1] >= cb[1] + MIN_OFFSET}[rel]


def layout(prompt: Prompt | str, rng: np.random.Generator, max_tries: int = 1000) -> list[tuple[int, int, int, int]]:
    """A random layout of the prompt's objects: [(object index, x0, y0, side), ...] obeying the spec."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    objs = [o for o, n in p.objects for _ in range(n)]
    for _ in range(max_tries):
        boxes: list[tuple[int, int, int]] = []
        for _o in objs:
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            box = (int(rng.integers(0, SIZE - side + 1)), int(rng.integers(0, SIZE - side + 1)), side)
            if not _gap_ok(box, boxes):
                break
            boxes.append(box)
        else:
            if p.relation is None or _relation_ok(p.relation[1], boxes[0], boxes[1]):
                return [(o, *b) for o, b in zip(objs, boxes)]
    raise RuntimeError(f"no layout found for {p.text!r} in {max_tries} tries")


def draw(objects: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Render a layout to a float32 image [3, 32, 32] in [0, 1]."""
    image = np.zeros((3, SIZE, SIZE), np.float32)
    for obj, x0, y0, side in objects:
        color, shape = OBJECTS[obj]
        mask = shape_mask(shape, x0, y0, side)
        image[:, mask] = np.asarray(COLORS[color], np.float32)[:, None]
    return image


@dataclass
class Scene:
    """What an image shows, in the form the verifier predicts: counts [18] and box centres [18, 2] (x, y; the first
    instance's; NaN where absent)."""

    counts: np.ndarray
    centres: np.ndarray


def scene_of(objects: list[tuple[int, int, int, int]]) -> Scene:
    counts = np.zeros(len(OBJECTS), np.int64)
    centres = np.full((len(OBJECTS), 2), np.nan, np.float32)
    for obj, x0, y0, side in objects:
        if counts[obj] == 0:
            centres[obj] = (x0 + side / 2, y0 + side / 2)
        counts[obj] += 1
    return Scene(counts, centres)


def render(prompts: list[str], seed: int) -> tuple[np.ndarray, list[Scene]]:
    """Render one image per prompt: images [N, 3, 32, 32] float32 in [0, 1] and their scenes."""
    rng = np.random.default_rng(seed)
    images, scenes = [], []
    for text in prompts:
        objs = layout(text, rng)
        images.append(draw(objs))
        scenes.append(scene_of(objs))
    return np.stack(images), scenes


def satisfies(prompt: Prompt | str, counts: np.ndarray, centres: np.ndarray, margin: float = 2.0) -> bool:
    """Whether a scene (counts [18], centres [18, 2]) satisfies the prompt exactly: the named objects with their
    counts and no others, and for a relation prompt the centres at least `margin` px apart in the right direction
    (the renderer guarantees 4 px; judging generated images asks for half of that)."""
    p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    want = np.zeros(len(OBJECTS), np.int64)
    for o, n in p.objects:
        want[o] = n
    if not np.array_equal(np.asarray(counts), want):
        return False
    if p.relation is None:
        return True
    a, rel, b = p.relation
    dx, dy = centres[b] - centres[a]  # B minus A
    return bool({"left of": dx >= margin, "right of": -dx >= margin, "above": dy >= margin,
                 "below": -dy >= margin}[rel])


def rule_scene(image: np.ndarray) -> Scene:
    """Read the scene of a *rendered* image exactly (colour segmentation + fill ratio), for checking the renderer and
    data; generated images are judged by the learned judge (`rewards.shapes`), which tolerates blur and colour drift."""
    from scipy import ndimage

    counts = np.zeros(len(OBJECTS), np.int64)
    centres = np.full((len(OBJECTS), 2), np.nan, np.float32)
    rgb = np.asarray(image) > 0.5  # [3, H, W]
    for ci, value in enumerate(COLORS.values()):
        mask = np.all(rgb == np.asarray(value, bool)[:, None, None], axis=0)
        labels, n = ndimage.label(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            fill = len(xs) / (w * h)
            shape = "square" if fill > 0.93 else ("circle" if fill > 0.68 else "triangle")
            obj = ci * len(SHAPES) + SHAPES.index(shape)
            if counts[obj] == 0:
                centres[obj] = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
            counts[obj] += 1
    return Scene(counts, centres)
