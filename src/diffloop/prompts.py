"""Prompt sources: named prompt lists, and the seeded draw of each epoch's prompts.

Sources (``available_prompt_sources()``):
    list                      inline prompts (``prompts=[...]``)
    file                      a text file (``path=``): one prompt a line; blank lines and lines
                              starting with '#' are skipped; surrounding whitespace is stripped
    ddpo/<name>               DDPO's lists (simple_animals, imagenet_classes, activities; MIT)
    ddpo/animals_activities   DDPO's prompt-alignment prompts: every simple_animals x activities
                              pair, "a cat riding a bike" (``animals_activities_prompts``)
    t2i-compbench/<category>_<split>
                              every T2I-CompBench file: category in color (alias colour), shape,
                              texture, spatial, non_spatial, complex, numeracy, 3d_spatial; split
                              in train, val, and val_seen / val_unseen for color, shape, texture (MIT)
    shapes/<split>            the synthetic shapes world, ``diffloop.shapes.world.prompt_splits()``

The packaged lists live in ``diffloop/data`` (read with importlib.resources) with their licences.

Sampling: epoch e of a run with seed s draws its prompts with ``numpy.random.default_rng([s, e])``,
uniformly with replacement. The draw is a pure function of (s, e): every process draws the same
list, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import importlib.resources
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffloop.errors import DiffloopError, did_you_mean

_DATA = importlib.resources.files("diffloop") / "data"


class PromptError(DiffloopError, ValueError):
    """A prompt source that does not exist or holds no usable prompts; the message says which."""


@dataclass(frozen=True)
class PromptSource:
    """A named, non-empty list of prompts.

    Fields:
        name:    where the prompts came from (a registry name, or ``file:<path>``).
        prompts: the prompts, in file order.
    """

    name: str
    prompts: list[str]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptError(f"prompt source {self.name!r} has no prompts")
        bad = [p for p in self.prompts if not isinstance(p, str)]
        if bad:
            raise PromptError(f"prompt source {self.name!r}: prompts must be str, got {bad[0]!r}")

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, seed: int, epoch: int) -> list[str]:
        """n prompts drawn uniformly with replacement.

        idx_i ~ U{0, ..., len - 1}, i < n, from numpy.random.default_rng([seed, epoch]): a pure
        function of (seed, epoch), whatever was drawn before.
        """
        if n < 0 or seed < 0 or epoch < 0:
            raise ValueError(f"n, seed, epoch must be >= 0, got n={n}, seed={seed}, epoch={epoch}")
        idx = np.random.default_rng([seed, epoch]).integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx]

    def iterate_fixed(self, n: int) -> list[str]:
        """The first n prompts in order, cycling past the end (the same for every evaluation)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


def parse_prompt_lines(text: str) -> list[str]:
    """One prompt a line, stripped; blank lines and lines starting with '#' are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _control_character(text: str) -> tuple[int, str] | None:
    """(line number, character name) of the first control character other than tab, or None."""
    for number, line in enumerate(text.splitlines(), start=1):
        for ch in line:
            if ch != "\t" and unicodedata.category(ch) == "Cc":
                return number, "NUL" if ch == "\0" else f"U+{ord(ch):04X}"
    return None


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a user file; PromptError naming the path if missing, unreadable, not UTF-8
    text (binary: NUL or other control characters), or without prompts."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PromptError(f"prompt file {str(path)!r} does not exist")
    if not p.is_file():
        raise PromptError(f"prompt file {str(path)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {str(path)!r} is not readable UTF-8 text: {exc}") from exc
    if (bad := _control_character(text)) is not None:
        raise PromptError(
            f"prompt file {str(path)!r} line {bad[0]} contains the control character {bad[1]}: it "
            "looks binary, not text (one prompt a line)"
        )
    prompts = parse_prompt_lines(text)
    if not prompts:
        raise PromptError(
            f"prompt file {str(path)!r} contains no prompts (one prompt a line; blank lines and "
            "lines starting with '#' are skipped)"
        )
    return prompts


def _packaged(folder: str, filename: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        return parse_prompt_lines((_DATA / folder / filename).read_text(encoding="utf-8"))

    return load


def indefinite_article(noun: str) -> str:
    """"an" before a vowel letter, else "a" (enough for DDPO's animal list; inflect is not needed)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def animals_activities_prompts() -> list[str]:
    """DDPO's ``nouns_activities("simple_animals.txt", "activities.txt")`` as a list.

    DDPO draws f"{a/an} {animal} {activity}" with the animal and activity chosen independently and
    uniformly, which is a uniform draw from this cross product (animal-major order): 45 x 3 prompts.
    """
    animals = _packaged("ddpo-prompts", "simple_animals.txt")()
    activities = _packaged("ddpo-prompts", "activities.txt")()
    return [f"{indefinite_article(a)} {a} {act}" for a in animals for act in activities]


def _packaged_sources() -> dict[str, Callable[[], list[str]]]:
    sources = {
        f"ddpo/{stem}": _packaged("ddpo-prompts", f"{stem}.txt")
        for stem in ("simple_animals", "imagenet_classes", "activities")
    }
    sources["ddpo/animals_activities"] = animals_activities_prompts
    for entry in sorted((_DATA / "t2i-compbench").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            stem = entry.name[: -len(".txt")]
            sources[f"t2i-compbench/{stem}"] = _packaged("t2i-compbench", entry.name)
    return sources


# name -> zero-argument loader of the prompt list. "list", "file" and "shapes/<split>" are
# handled by build_prompt_source (they take arguments or are resolved lazily).
PROMPT_SOURCES: dict[str, Callable[[], list[str]]] = _packaged_sources()
_SPECIAL = ("list", "file", "shapes/<split>")
# British spelling of the T2I-CompBench category (the "colour") -> the file name's.
_ALIASES = {"t2i-compbench/colour_": "t2i-compbench/color_"}


def _resolve_alias(name: str) -> str:
    for alias, canonical in _ALIASES.items():
        if name.startswith(alias):
            return canonical + name[len(alias) :]
    return name


def available_prompt_sources() -> list[str]:
    """Every source name build_prompt_source accepts ("shapes/<split>" stands for its splits)."""
    return sorted([*PROMPT_SOURCES, *_SPECIAL])


def _shapes_prompts(split: str) -> list[str]:
    from diffloop.shapes.world import prompt_splits  # lazy: the shapes world is optional here

    splits = prompt_splits()
    if split not in splits:
        raise PromptError(
            f"unknown shapes split {split!r}.{did_you_mean(split, sorted(splits))} "
            f"Available: {', '.join('shapes/' + s for s in sorted(splits))}"
        )
    return list(splits[split])


def build_prompt_source(
    name: str, path: str | None = None, prompts: list[str] | None = None
) -> PromptSource:
    """The prompt source ``name``: ``path`` for "file", ``prompts`` for "list" (see module doc)."""
    if path is not None and name != "file":
        raise PromptError(f"prompts path={path!r} is only used with source 'file', not {name!r}")
    if prompts is not None and name != "list":
        raise PromptError(f"inline prompts are only used with source 'list', not {name!r}")
    if name == "list":
        if not prompts:
            raise PromptError("prompt source 'list' needs a non-empty list of prompts")
        return PromptSource("list", list(prompts))
    if name == "file":
        if path is None:
            raise PromptError("prompt source 'file' needs path=<text file, one prompt a line>")
        return PromptSource(f"file:{path}", read_prompt_file(path))
    if name.startswith("shapes/"):
        return PromptSource(name, _shapes_prompts(name[len("shapes/") :]))
    if _resolve_alias(name) in PROMPT_SOURCES:
        return PromptSource(_resolve_alias(name), PROMPT_SOURCES[_resolve_alias(name)]())
    names = available_prompt_sources()
    raise PromptError(
        f"unknown prompt source {name!r}.{did_you_mean(name, names)} Available: {', '.join(names)}"
    )
