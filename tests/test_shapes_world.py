"""Shapes world: caption grammar round trip, prompt splits, renderer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffloop.shapes import world
from diffloop.shapes.reward import connected_components
from diffloop.shapes.world import COLORS, SHAPES, TEXTURES, ObjectSpec

ALL_PHRASES = [
    ObjectSpec(c, s, t) for t in (None, *TEXTURES) for c in (None, *COLORS) for s in SHAPES
]


# ---------------------------------------------------------------------------------- grammar
def test_vocabulary_sizes() -> None:
    assert len(COLORS) >= 6 and len(SHAPES) >= 4 and len(TEXTURES) >= 2
    assert world.IMAGE_SIZE == 32


def test_caption_examples() -> None:
    assert world.caption([ObjectSpec("red", "circle")]) == "a red circle"
    assert world.caption([ObjectSpec(None, "triangle", "striped")]) == "a striped triangle"
    assert (
        world.caption([ObjectSpec("blue", "square", "striped"), ObjectSpec("green", "triangle")])
        == "a striped blue square and a green triangle"
    )


def test_round_trip_every_single_and_pair() -> None:
    for obj in ALL_PHRASES:
        assert world.parse_caption(world.caption([obj])) == [obj]
    for a, b in itertools.product(ALL_PHRASES, repeat=2):  # 84^2 = 7056 pairs
        assert world.parse_caption(world.caption([a, b])) == [a, b]


def test_parse_is_tolerant_of_case_and_spaces_only() -> None:
    assert world.parse_caption("  A Red   circle ") == [ObjectSpec("red", "circle")]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty noun phrase"),
        ("a red", "is not 'a [texture] [colour] shape'"),
        ("a blue banana", "is not 'a [texture] [colour] shape'"),
        ("red circle", "must start with 'a'"),
        ("a circle red", "is not 'a [texture] [colour] shape'"),
        ("a red striped circle", "is not 'a [texture] [colour] shape'"),  # order is fixed
        ("a red circle and", "empty noun phrase"),
        ("a red circle and a blue square and a green cross", "at most 2"),
    ],
)
def test_parse_rejects_outside_grammar(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        world.parse_caption(text)


def test_caption_rejects_bad_counts_and_unknown_words() -> None:
    with pytest.raises(ValueError, match="1 to 2 objects"):
        world.caption([])
    with pytest.raises(ValueError, match="unknown colour"):
        ObjectSpec("mauve", "circle")
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("red", "hexagon")


def test_vocabulary_is_exactly_the_words_used() -> None:
    splits = world.prompt_splits()
    used = {w for texts in splits.values() for t in texts for w in t.split()}
    assert used == set(world.vocabulary())
    assert len(world.vocabulary()) == len(set(world.vocabulary())) == 2 + 2 + 6 + 4


# ----------------------------------------------------------------------------------- splits
def _combos(text: str) -> set[tuple[str | None, str]]:
    return {(o.color, o.shape) for o in world.parse_caption(text)}


def test_splits_keys_sizes_and_determinism() -> None:
    splits = world.prompt_splits()
    assert splits == world.prompt_splits()
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {
        "train": 476,
        "train_single": 72,
        "train_pair": 404,
        "val": 328,
        "val_single": 12,
        "val_pair": 316,
        "val_seen": 100,
        "val_unseen": 216,
    }
    assert splits["train"] == splits["train_single"] + splits["train_pair"]
    assert splits["val_pair"] == splits["val_seen"] + splits["val_unseen"]
    assert splits["val"] == splits["val_single"] + splits["val_pair"]
    for texts in splits.values():
        assert len(set(texts)) == len(texts)
    splits["train"].clear()  # callers get fresh lists
    assert len(world.prompt_splits()["train"]) == 476


def test_unseen_combinations_never_in_training() -> None:
    splits = world.prompt_splits()
    unseen = world.UNSEEN_COMBINATIONS
    assert len(unseen) / (len(COLORS) * len(SHAPES)) == pytest.approx(4 / 24)
    assert not set(splits["train"]) & set(splits["val"])
    for text in splits["train"]:
        assert not _combos(text) & unseen, text
    for text in splits["val_unseen"] + splits["val_single"]:
        assert _combos(text) & unseen, text
    for text in splits["val_seen"]:
        assert not _combos(text) & unseen, text
    # Every colour, shape and texture is still taught in training.
    train_words = {w for t in splits["train"] for w in t.split()}
    assert set(COLORS) | set(SHAPES) | set(TEXTURES) <= train_words


def test_val_seen_arrangements_are_new_and_pairs_bind() -> None:
    splits = world.prompt_splits()
    train_arrangements = {frozenset(_combos(t)) for t in splits["train_pair"]}
    for text in splits["val_seen"]:
        assert frozenset(_combos(text)) not in train_arrangements, text
    for text in splits["train_pair"] + splits["val_pair"]:
        a, b = world.parse_caption(text)
        assert a.color and b.color and a.color != b.color and a.shape != b.shape, text


# --------------------------------------------------------------------------------- renderer
def _pixels_of(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((img == np.array(rgb, np.uint8)).all(axis=-1).sum())


def test_render_shape_dtype_background_and_determinism() -> None:
    objs = [ObjectSpec("red", "circle"), ObjectSpec("blue", "square", "striped")]
    a = world.render(objs, np.random.default_rng(3))
    b = world.render(objs, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert _pixels_of(a, world.BACKGROUND) > 32 * 32 // 2
    assert world.render(objs, np.random.default_rng(3), size=64).shape == (64, 64, 3)


def test_coverage_of_each_shape() -> None:
    side = 15
    area = {s: float(world._coverage(s, side).sum()) for s in SHAPES}
    assert area["square"] == side * side
    assert area["circle"] == pytest.approx(np.pi * side**2 / 4, rel=0.03)
    assert area["triangle"] == pytest.approx(side**2 / 2, rel=0.08)
    assert area["cross"] == 2 * side * 5 - 5 * 5  # arms round(15/3) = 5 px wide, crisp
    for s in SHAPES:
        cover = world._coverage(s, side)
        assert cover.min() >= 0.0 and cover.max() == 1.0


def test_render_solid_and_striped_paint() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        solid = world.render([ObjectSpec("green", "square", "solid")], rng)
        n_green = _pixels_of(solid, COLORS["green"])
        assert n_green >= 10 * 10 and _pixels_of(solid, world.STRIPE_INK) == 0
        striped = world.render([ObjectSpec("green", "square", "striped")], rng)
        n_col, n_ink = _pixels_of(striped, COLORS["green"]), _pixels_of(striped, world.STRIPE_INK)
        # Rows alternate 2 colour / 2 ink from the top: a side-s square has ceil-ish halves.
        side = int(np.sqrt(n_col + n_ink))
        assert side * side == n_col + n_ink and 12 <= side <= 18
        assert n_col == side * (2 * (side // 4) + min(side % 4, 2))


def test_render_objects_are_separate_and_colours_distinct() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        img = world.render([ObjectSpec(None, "circle"), ObjectSpec(None, "cross")], rng)
        x = torch.from_numpy(img).float() / 255.0
        bg = torch.tensor(world.BACKGROUND) / 255.0
        mask = (x - bg).norm(dim=-1) > 0.05  # any non-background pixel
        labels = connected_components(mask[None])
        assert len(labels.unique()) - 1 == 2  # two objects, not touching (8-neighbour)
        present = [c for c, rgb in COLORS.items() if _pixels_of(img, rgb) > 0]
        assert len(present) == 2


def test_layout_boxes_inside_and_apart() -> None:
    rng = np.random.default_rng(2)
    objs = [ObjectSpec("red", "circle", "striped"), ObjectSpec("blue", "cross", "solid")]
    for _ in range(300):
        boxes = world._layout(objs, rng, 32)
        (xa, ya, sa), (xb, yb, sb) = boxes
        assert 12 <= sa <= 14 and 10 <= sb <= 14
        for x0, y0, s in boxes:
            assert x0 >= 1 and y0 >= 1 and x0 + s <= 31 and y0 + s <= 31
        assert xa + sa + 2 <= xb or xb + sb + 2 <= xa or ya + sa + 2 <= yb or yb + sb + 2 <= ya


def test_resolve_respects_allowed_combinations() -> None:
    rng = np.random.default_rng(4)
    allowed = world.training_combinations()
    colours = {
        world.resolve_objects([ObjectSpec(None, "triangle")], rng, allowed)[0].color
        for _ in range(200)
    }
    assert colours == set(COLORS) - {"red"}  # ("red", "triangle") is held out
    resolved = world.resolve_objects([ObjectSpec("red", "circle"), ObjectSpec(None, "square")], rng)
    assert resolved[1].color != "red" and resolved[1].texture in TEXTURES


def test_sample_training_example_uses_training_combinations_only() -> None:
    rng = np.random.default_rng(5)
    train = set(world.prompt_splits()["train"])
    n_pairs = 0
    for _ in range(300):
        img, text = world.sample_training_example(rng, pair_prob=0.5)
        assert text in train and img.shape == (32, 32, 3)
        objs = world.parse_caption(text)
        n_pairs += len(objs) == 2
        present = {c for c, rgb in COLORS.items() if _pixels_of(img, rgb) > 0}
        assert len(present) == len(objs)
        named = {o.color for o in objs if o.color}
        for obj in objs:  # the colour drawn for an unnamed object is a training combination
            colour = obj.color or (present - named).pop()
            assert (colour, obj.shape) not in world.UNSEEN_COMBINATIONS, text
    assert 120 <= n_pairs <= 180
