"""The shapes world: a renderer, a caption grammar and prompt splits for attribute binding.

A CPU-sized stand-in for T2I-CompBench's attribute-binding categories (colour / shape / texture):
scenes of one or two flat objects on a plain background, each object a colour, a shape and a fill
texture, at random non-overlapping positions and sizes, captioned in T2I-CompBench's style.

Grammar (every caption ``caption()`` writes, and exactly what ``parse_caption()`` accepts)::

    caption := phrase | phrase " and " phrase
    phrase  := "a" [texture] [colour] shape          e.g. "a striped blue square"
    texture := "solid" | "striped"                   colour := "red" | "yellow" | ... (COLORS)
    shape   := "circle" | "square" | "triangle" | "cross"

A missing colour or texture means "unspecified": ``render`` draws it at random (distinct colours
for distinct objects), and the binding reward does not check it.

Design choices, each for the reward's sake (see ``reward.py``):
- Colours are six hues about 60 degrees apart (red 0, yellow 54, green 120, cyan 180, blue 230,
  purple 285), all saturated and bright (HSV value >= 0.72), so a pixel's hue names its colour even
  after blur with the background or the stripe ink (both grey: blur changes chroma, not hue).
- The background is near-white and the stripe ink near-black, so "object or not" is the distance
  from the background colour and "ink or not" is the HSV value: a striped object keeps a solid
  silhouette (its shape is read the same way) and its texture is the ink fraction inside it.
- Stripes are horizontal, 2 rows of colour then 2 rows of ink (period 4 px at 32 px), on objects
  >= 12 px: at least three periods, and still visible after a Gaussian blur of sigma 0.7 px.
- Shapes are axis-aligned and fill a square bounding box (circle inscribed, square = the box,
  triangle apex-up isosceles, cross = plus sign with arms 1/3 of the box): told apart at 10 px.
- Rendering is 4x supersampled then box-filtered: anti-aliased edges, like a diffusion model's.

Splits (T2I-CompBench-style seen / unseen): four (colour, shape) combinations, one per shape and
per colour (``UNSEEN_COMBINATIONS``, 4 of 24 = 17%), never appear in any training caption or
training render; ``val_unseen`` holds the two-object captions that use them. ``val_seen`` holds
two-object captions made only of training combinations, in arrangements (unordered pairs of
combinations) held out of training. Two-object captions have distinct colours and distinct shapes,
so that swapping colours between the objects changes the scene (the binding test).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 30),
    "green": (40, 185, 40),
    "cyan": (30, 205, 205),
    "blue": (50, 80, 235),
    "purple": (170, 40, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TEXTURES: tuple[str, ...] = ("solid", "striped")
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
STRIPE_INK: tuple[int, int, int] = (35, 35, 35)

# Held out of every training caption and training render: one per shape, one per colour.
UNSEEN_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
)
MAX_OBJECTS = 2
_SUPERSAMPLE = 4
_SPLIT_SEED = 20260101
_VAL_SEEN_FRACTION = 0.2


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene or one noun phrase of a caption; None = unspecified."""

    color: str | None
    shape: str
    texture: str | None = None

    def __post_init__(self) -> None:
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {list(SHAPES)}")
        if self.texture is not None and self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; known: {list(TEXTURES)}")


# ----------------------------------------------------------------------------------- grammar
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ObjectSpec) -> str:
    words = [w for w in (obj.texture, obj.color, obj.shape) if w is not None]
    return " ".join([_article(words[0]), *words])


def caption(objects: Sequence[ObjectSpec]) -> str:
    """The caption of one or two objects: "a red circle", "a striped blue square and a triangle"."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a caption describes 1 to {MAX_OBJECTS} objects, got {len(objects)}")
    return " and ".join(_phrase(o) for o in objects)


def _parse_phrase(words: list[str], text: str) -> ObjectSpec:
    if not words:
        raise ValueError(f"empty noun phrase in caption {text!r}")
    if words[0] not in ("a", "an"):
        raise ValueError(f"noun phrase must start with 'a', got {words[0]!r} in {text!r}")
    rest = words[1:]
    texture = rest.pop(0) if rest and rest[0] in TEXTURES else None
    color = rest.pop(0) if rest and rest[0] in COLORS else None
    if len(rest) != 1 or rest[0] not in SHAPES:
        raise ValueError(
            f"noun phrase {' '.join(words)!r} in {text!r} is not 'a [texture] [colour] shape' "
            f"(textures {list(TEXTURES)}, colours {list(COLORS)}, shapes {list(SHAPES)})"
        )
    return ObjectSpec(color=color, shape=rest[0], texture=texture)


def parse_caption(text: str) -> list[ObjectSpec]:
    """Inverse of ``caption()`` (case and extra spaces ignored); ValueError outside the grammar."""
    words = text.strip().lower().split()
    phrases: list[list[str]] = [[]]
    for word in words:
        if word == "and":
            phrases.append([])
        else:
            phrases[-1].append(word)
    if len(phrases) > MAX_OBJECTS:
        raise ValueError(f"caption {text!r} has {len(phrases)} noun phrases; at most {MAX_OBJECTS}")
    return [_parse_phrase(p, text) for p in phrases]


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (for a word-level tokenizer)."""
    heads = [*TEXTURES, *COLORS, *SHAPES]
    articles = sorted({_article(w) for w in heads})
    return [*articles, "and", *heads]


# ---------------------------------------------------------------------------------- renderer
def resolve_objects(
    objects: Sequence[ObjectSpec],
    rng: np.random.Generator,
    allowed: frozenset[tuple[str, str]] | None = None,
) -> list[ObjectSpec]:
    """Fill unspecified colours (distinct across objects) and textures at random.

    ``allowed``: if given, an unspecified colour is drawn only among colours whose
    (colour, shape) pair is in ``allowed`` (used to keep held-out combinations out of training).
    """
    taken = {o.color for o in objects if o.color is not None}
    out = []
    for obj in objects:
        color = obj.color
        if color is None:
            options = [
                c
                for c in COLORS
                if c not in taken and (allowed is None or (c, obj.shape) in allowed)
            ]
            if not options:
                raise ValueError(f"no colour left for {obj} (taken {sorted(taken)})")
            color = options[int(rng.integers(len(options)))]
            taken.add(color)
        texture = (
            obj.texture if obj.texture is not None else TEXTURES[int(rng.integers(len(TEXTURES)))]
        )
        out.append(ObjectSpec(color=color, shape=obj.shape, texture=texture))
    return out


def _size_range(n_objects: int, texture: str, size: int) -> tuple[int, int]:
    """Object side range in px: >= 10 px at 32 (shapes legible), >= 12 if striped (3 periods)."""
    lo = round(size * (0.375 if texture == "striped" else 0.3125))
    hi = round(size * (0.5625 if n_objects == 1 else 0.4375))  # two 14-px objects fit in 32
    return lo, max(lo, hi)


def _separated(a: tuple[int, int, int], b: tuple[int, int, int], margin: int) -> bool:
    (xa, ya, sa), (xb, yb, sb) = a, b
    return (
        xa + sa + margin <= xb
        or xb + sb + margin <= xa
        or ya + sa + margin <= yb
        or yb + sb + margin <= ya
    )


def _layout(
    objects: Sequence[ObjectSpec], rng: np.random.Generator, size: int, tries: int = 500
) -> list[tuple[int, int, int]]:
    """Random (x0, y0, side) boxes, 1 px from the border, >= 2 px apart (at 32 px)."""
    border, margin = max(1, size // 32), max(2, size // 16)
    for _ in range(tries):
        boxes: list[tuple[int, int, int]] = []
        for obj in objects:
            lo, hi = _size_range(len(objects), obj.texture or "solid", size)
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(border, size - border - side + 1, size=2))
            box = (x0, y0, side)
            if not all(_separated(box, other, margin) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == len(objects):
            return boxes
    raise ValueError(f"could not place {len(objects)} objects in a {size}x{size} image")


def _coverage(shape: str, side: int, f: int = _SUPERSAMPLE) -> np.ndarray:
    """(side, side) float32 fraction of each pixel covered by ``shape`` filling a side x side box.

    Drawn at f x f supersampling with PIL, then box-filtered (anti-aliased edges).
    """
    s = side * f
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    last = s - 1  # PIL boxes include their last pixel
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "triangle":
        draw.polygon([(last / 2, 0), (0, last), (last, last)], fill=255)
    elif shape == "cross":
        # Arms a whole number of output pixels wide (crisp edges: anti-aliased thin arms at
        # 10 px read as a blob): width round(side/3) px, offset floor((side - width)/2) px.
        arm = round(side / 3)
        off = (side - arm) // 2
        draw.rectangle((off * f, 0, (off + arm) * f - 1, last), fill=255)
        draw.rectangle((0, off * f, last, (off + arm) * f - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = np.asarray(img, dtype=np.float32) / 255.0
    return cover.reshape(side, f, side, f).mean(axis=(1, 3))


def stripe_period(size: int = IMAGE_SIZE) -> int:
    """Stripe period in px (half colour, half ink): 4 at 32 px, scaled with the resolution."""
    return max(4, 2 * round(2 * size / IMAGE_SIZE))


def render(
    objects: Sequence[ObjectSpec], rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
    """(size, size, 3) uint8 scene: the objects at random non-overlapping positions and sizes.

    Unspecified colours / textures are drawn at random (``resolve_objects``). Anti-aliased: each
    pixel is background * (1 - c) + paint * c with c the shape's 4x4-supersampled coverage; stripes
    are whole pixel rows (rows ``(y - y0) mod P >= P/2`` are ink, P = 4 at 32 px), so this equals
    rendering at 4x and box-filtering.
    """
    resolved = resolve_objects(objects, rng)
    boxes = _layout(resolved, rng, size)
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    period = stripe_period(size)
    for obj, (x0, y0, side) in zip(resolved, boxes, strict=True):
        cover = _coverage(obj.shape, side)[..., None]  # (side, side, 1)
        paint = np.empty((side, 1, 3), np.float32)
        paint[:] = COLORS[obj.color]  # type: ignore[index]
        if obj.texture == "striped":
            paint[np.arange(side) % period >= period // 2] = STRIPE_INK
        box = img[y0 : y0 + side, x0 : x0 + side]
        box[:] = box * (1.0 - cover) + paint * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ splits
def _combinations() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[str, ...]]:
    rng = np.random.default_rng(_SPLIT_SEED)
    train_single, val_single = [], []
    for texture in (None, *TEXTURES):
        for color in (None, *COLORS):
            for shape in SHAPES:
                text = caption([ObjectSpec(color, shape, texture)])
                (val_single if (color, shape) in UNSEEN_COMBINATIONS else train_single).append(text)

    # Arrangements: unordered pairs of combinations with distinct colours and distinct shapes.
    arrangements = [
        (a, b)
        for a, b in itertools.combinations(_combinations(), 2)
        if a[0] != b[0] and a[1] != b[1]
    ]
    seen = [ab for ab in arrangements if not (set(ab) & UNSEEN_COMBINATIONS)]
    unseen = [ab for ab in arrangements if set(ab) & UNSEEN_COMBINATIONS]
    order = rng.permutation(len(seen))
    n_val = round(_VAL_SEEN_FRACTION * len(seen))
    val_seen_arr = [seen[i] for i in sorted(order[:n_val])]
    train_arr = [seen[i] for i in sorted(order[n_val:])]
    textured = [t for t in itertools.product((None, *TEXTURES), repeat=2) if t != (None, None)]

    def pair_captions(arrs: list[tuple[tuple[str, str], tuple[str, str]]]) -> list[str]:
        # Both orders; each order once plain and once with one texture variant (drawn, seeded).
        out = []
        for a, b in arrs:
            for first, second in ((a, b), (b, a)):
                t1, t2 = textured[int(rng.integers(len(textured)))]
                out.append(
                    caption([ObjectSpec(first[0], first[1]), ObjectSpec(second[0], second[1])])
                )
                out.append(
                    caption(
                        [ObjectSpec(first[0], first[1], t1), ObjectSpec(second[0], second[1], t2)]
                    )
                )
        return out

    train_pair = pair_captions(train_arr)
    val_seen = pair_captions(val_seen_arr)
    val_unseen = pair_captions(unseen)
    return {
        "train": tuple(train_single + train_pair),
        "train_single": tuple(train_single),
        "train_pair": tuple(train_pair),
        "val": tuple(val_single + val_seen + val_unseen),
        "val_single": tuple(val_single),
        "val_pair": tuple(val_seen + val_unseen),
        "val_seen": tuple(val_seen),
        "val_unseen": tuple(val_unseen),
    }


def prompt_splits() -> dict[str, list[str]]:
    """Deterministic prompt lists (fresh lists each call).

    Keys: ``train`` = ``train_single`` + ``train_pair``; ``val`` = ``val_single`` + ``val_pair``;
    ``val_pair`` = ``val_seen`` + ``val_unseen``. ``val_single``: one-object captions of the
    held-out combinations. Sizes: train_single 72, train_pair 404, val_single 12, val_seen 100,
    val_unseen 216.
    """
    return {k: list(v) for k, v in _splits().items()}


def uses_unseen_combination(text: str) -> bool:
    """Whether caption ``text`` names a held-out (colour, shape) combination (UNSEEN_COMBINATIONS):
    the "unseen" half of the T2I-CompBench-style split; ValueError outside the grammar."""
    return any((o.color, o.shape) in UNSEEN_COMBINATIONS for o in parse_caption(text))


def training_combinations() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs allowed in training captions and renders."""
    return frozenset(_combinations()) - UNSEEN_COMBINATIONS


def sample_training_example(
    rng: np.random.Generator, size: int = IMAGE_SIZE, pair_prob: float = 0.5
) -> tuple[np.ndarray, str]:
    """A render and its caption for pretraining, drawn only from training prompts and combinations.

    With probability ``pair_prob`` a ``train_pair`` caption, else a ``train_single`` one (uniform
    within the list); unspecified colours are drawn among training combinations only.
    """
    splits = _splits()
    pool = splits["train_pair"] if rng.random() < pair_prob else splits["train_single"]
    text = pool[int(rng.integers(len(pool)))]
    objects = resolve_objects(parse_caption(text), rng, allowed=training_combinations())
    return render(objects, rng, size), text
