"""The shapes task's grammar and renderer follow the spec in `rewards/shapes_task.py` exactly."""

import numpy as np
import pytest

from rewards import shapes_task as task

COLOR_VALUES = {tuple(v) for v in task.COLORS.values()}


def test_prompt_counts_and_split():
    prompts = task.all_prompts()
    assert len(prompts) == 1431 == len(set(prompts))
    kinds = [task.kind_of(p) for p in prompts]
    assert [kinds.count(k) for k in task.KINDS] == [18, 36, 153, 1224]
    train, held = task.split_prompts("train"), task.split_prompts("heldout")
    assert set(train) | set(held) == set(prompts) and not set(train) & set(held)
    held_kinds = [task.kind_of(p) for p in held]
    assert held_kinds.count("binding") == round(0.2 * 153) and held_kinds.count("relation") == round(0.2 * 1224)
    assert held_kinds.count("single") == held_kinds.count("counting") == 0
    assert task.split_prompts("heldout") == held  # fixed, not re-drawn
    assert task.model_prompts() == train + held


def test_parse_roundtrip_and_bad_prompts():
    p = task.parse_prompt("a red circle left of a blue square")
    assert p.kind == "relation" and p.relation == (0, "left of", task.OBJECTS.index(("blue", "square")))
    assert task.parse_prompt("three cyan triangles").objects == ((task.OBJECTS.index(("cyan", "triangle")), 3),)
    for bad, match in [("a purple circle", "not an object"), ("a red hexagon", "not an object"),
                       ("four red circles", "not in the shapes grammar"), ("a red circle and a red circle", "two different"),
                       ("a blue square and a red circle", "canonical order"), ("", "not in the shapes grammar")]:
        with pytest.raises(ValueError, match=match):
            task.parse_prompt(bad)
    with pytest.raises(ValueError, match="split"):
        task.split_prompts("validation")
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        task.render(["a red circle on a blue square"], seed=0)


def test_shape_masks_follow_the_geometry():
    for side in range(task.MIN_SIDE, task.MAX_SIDE + 1):
        sq = task.shape_mask("square", 3, 4, side)
        ys, xs = np.nonzero(sq)
        assert sq.sum() == side * side and xs.min() == 3 and ys.min() == 4
        circ = task.shape_mask("circle", 3, 4, side)
        assert circ.sum() < side * side and abs(circ.sum() / (np.pi * side**2 / 4) - 1) < 0.2
        assert (circ & ~sq).sum() == 0  # inside its box
        tri = task.shape_mask("triangle", 3, 4, side)
        ys, xs = np.nonzero(tri)
        assert (tri & ~sq).sum() == 0
        widths = [int((ys == y).sum()) for y in range(ys.min(), ys.max() + 1)]
        assert widths == sorted(widths) and widths[-1] >= side - 1  # apex up, base at the bottom
        assert abs(xs.mean() - (3 + side / 2 - 0.5)) < 1e-9  # isosceles: symmetric about the box centre


def test_rendered_images_satisfy_their_prompts():
    prompts = task.sample_prompts(600, np.random.default_rng(0), split="all")
    rng = np.random.default_rng(1)
    for text in prompts:
        layout = task.layout(text, rng)
        image = task.draw(layout)
        assert image.shape == (3, 32, 32) and image.dtype == np.float32
        colours = {tuple(image[:, i, j]) for i in range(32) for j in range(32)}
        assert colours <= COLOR_VALUES | {(0.0, 0.0, 0.0)}  # exact colours, black background, no anti-aliasing
        for _, x0, y0, side in layout:
            assert task.MIN_SIDE <= side <= task.MAX_SIDE and 0 <= x0 <= 32 - side and 0 <= y0 <= 32 - side
        for (_, ax, ay, asz), (_, bx, by, bsz) in ((a, b) for i, a in enumerate(layout) for b in layout[i + 1:]):
            gap = max(bx - (ax + asz), ax - (bx + bsz), by - (ay + asz), ay - (by + bsz))
            assert gap >= task.MIN_GAP
        p = task.parse_prompt(text)
        scene = task.scene_of(layout)
        assert scene.counts.sum() == sum(n for _, n in p.objects)  # exactly the named objects
        assert task.satisfies(p, scene.counts, scene.centres, margin=task.MIN_OFFSET)
        read = task.rule_scene(image)  # the pixels show it too
        assert np.array_equal(read.counts, scene.counts)
        assert task.satisfies(p, read.counts, read.centres)


@pytest.mark.parametrize("relation,axis,sign", [("left of", 0, 1), ("right of", 0, -1), ("above", 1, 1),
                                                ("below", 1, -1)])
def test_each_relation_holds_with_the_offset(relation, axis, sign):
    text = f"a red circle {relation} a blue square"
    p = task.parse_prompt(text)
    rng = np.random.default_rng(2)
    for _ in range(50):
        layout = task.layout(text, rng)
        scene = task.scene_of(layout)
        a, b = p.relation[0], p.relation[2]
        assert sign * (scene.centres[b, axis] - scene.centres[a, axis]) >= task.MIN_OFFSET
    flipped = scene.centres.copy()
    flipped[[a, b]] = flipped[[b, a]]
    assert not task.satisfies(p, scene.counts, flipped)


def test_counts_and_extra_objects_fail_satisfaction():
    p = task.parse_prompt("two green squares")
    o = task.OBJECTS.index(("green", "square"))
    counts = np.zeros(18, np.int64)
    counts[o] = 2
    centres = np.zeros((18, 2), np.float32)
    assert task.satisfies(p, counts, centres)
    counts[o] = 3
    assert not task.satisfies(p, counts, centres)
    counts[o], counts[0] = 2, 1
    assert not task.satisfies(p, counts, centres)
