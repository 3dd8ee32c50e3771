"""Prompt sources: named prompt lists, and the seeded draw of each epoch's prompts.

Sources (``available_prompt_sources()``):
    list                      inline prompts (``prompts=[...]``)
    file                      a text file (``path=``): one prompt a line; blank lines and lines
                              starting with '#' are skipped; surrounding whitespace is stripped
    jsonl                     a JSON-lines file (``path=``): one object a line, the prompt under
                              ``column`` (default "prompt"), every other field the prompt's metadata
    csv                       a CSV file with a header row (``path=``): the same, fields as strings
    dataset                   a Hugging Face ``datasets`` dataset (``path=`` a hub id, a directory
                              saved with ``save_to_disk`` or of data files; ``split=``), the same
    ddpo/<name>               DDPO's lists (simple_animals, imagenet_classes, activities; MIT)
    ddpo/animals_activities   DDPO's prompt-alignment prompts: every simple_animals x activities
                              pair, "a cat riding a bike" (``animals_activities_prompts``)
    t2i-compbench/<category>_<split>
                              every T2I-CompBench file: category in color (alias colour), shape,
                              texture, spatial, non_spatial, complex, numeracy, 3d_spatial; split
                              in train, val, and val_seen / val_unseen for color, shape, texture
                              (MIT)
    shapes/<split>            the synthetic shapes world, ``diffloop.shapes.world.prompt_splits()``

The packaged lists live in ``diffloop/data`` (read with importlib.resources) with their licences.

Metadata: a row's other fields (GenEval-style object lists, T2I-CompBench categories, ...) travel
with its prompt to the reward, in training and in evaluation (``PromptSource.fields``); diffloop
adds its own keys (``RESERVED_FIELDS``) next to them, so a row may not use those names.

Sampling: epoch e of a run with seed s draws its prompts with ``numpy.random.default_rng([s, e])``,
uniformly with replacement. The draw is a pure function of (s, e): every process draws the same
list, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffloop.config import PATH_SOURCES
from diffloop.errors import DiffloopError, did_you_mean

if TYPE_CHECKING:
    from diffloop.config import Config, PromptConfig

_DATA = importlib.resources.files("diffloop") / "data"


class PromptError(DiffloopError, ValueError):
    """A prompt source that does not exist or holds no usable prompts; the message says which."""


# Metadata keys diffloop itself gives the reward: training (epoch, sample_index), evaluation
# (prompt_index, image_index). A dataset field of the same name would be shadowed, so it is refused.
RESERVED_FIELDS = ("epoch", "sample_index", "prompt_index", "image_index")


@dataclass(frozen=True)
class PromptSource:
    """A named, non-empty list of prompts, with optional per-prompt metadata.

    Fields:
        name:     where the prompts came from (a registry name, or ``file:<path>``).
        prompts:  the prompts, in file order.
        metadata: None, or one dict per prompt (its other fields), passed to the reward.
    """

    name: str
    prompts: list[str]
    metadata: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptError(f"prompt source {self.name!r} has no prompts")
        bad = [p for p in self.prompts if not isinstance(p, str)]
        if bad:
            raise PromptError(f"prompt source {self.name!r}: prompts must be str, got {bad[0]!r}")
        if self.metadata is not None:
            if len(self.metadata) != len(self.prompts):
                raise PromptError(
                    f"prompt source {self.name!r}: {len(self.metadata)} metadata rows for "
                    f"{len(self.prompts)} prompts"
                )
            for i, row in enumerate(self.metadata):
                clash = sorted(set(row) & set(RESERVED_FIELDS))
                if clash:
                    raise PromptError(
                        f"prompt source {self.name!r} row {i + 1}: field {clash[0]!r} is a name "
                        "diffloop gives the reward itself "
                        f"({', '.join(RESERVED_FIELDS)}); rename it"
                    )

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, n: int, seed: int, epoch: int) -> list[int]:
        """n prompt indices drawn uniformly with replacement.

        idx_i ~ U{0, ..., len - 1}, i < n, from numpy.random.default_rng([seed, epoch]): a pure
        function of (seed, epoch), whatever was drawn before.
        """
        if n < 0 or seed < 0 or epoch < 0:
            raise ValueError(f"n, seed, epoch must be >= 0, got n={n}, seed={seed}, epoch={epoch}")
        return np.random.default_rng([seed, epoch]).integers(0, len(self.prompts), size=n).tolist()

    def sample(self, n: int, seed: int, epoch: int) -> list[str]:
        """The prompts of :meth:`draw` (n, seed, epoch)."""
        return [self.prompts[i] for i in self.draw(n, seed, epoch)]

    def fixed_indices(self, n: int) -> list[int]:
        """n fixed indices spread evenly over the whole list (floor(i len / n), i < n), or every
        index in order, cycling, when n >= len. Evenly spread, not the first n: a split sorted by
        kind (shapes/val_pair lists its seen combinations before the unseen ones) is then evaluated
        on all its kinds."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        size = len(self.prompts)
        if n >= size:
            return [i % size for i in range(n)]
        return [i * size // n for i in range(n)]

    def iterate_fixed(self, n: int) -> list[str]:
        """The ``fixed_indices(n)`` prompts (the same for every evaluation)."""
        return [self.prompts[i] for i in self.fixed_indices(n)]

    def fields(self, index: int) -> dict[str, Any]:
        """A copy of prompt ``index``'s metadata ({} without metadata): the reward may not change
        the source's rows."""
        return dict(self.metadata[index]) if self.metadata is not None else {}


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


def _read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a user's prompt file; PromptError naming it if missing or unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptError(
            f"{what} {str(path)!r} {'is not a file' if p.exists() else 'does not exist'}"
        )
    try:
        return p.read_text(encoding="utf-8-sig")  # -sig: spreadsheet CSVs start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{what} {str(path)!r} is not readable UTF-8 text: {exc}") from exc


def rows_to_source(name: str, rows: Iterable[Any], column: str = "prompt") -> PromptSource:
    """A PromptSource from rows: strings (prompts without metadata) or mappings holding the prompt
    under ``column`` (every other field its metadata). Errors name the row (1-based) and the
    column."""
    prompts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, str):
            prompts.append(row)
            metadata.append({})
            continue
        if not isinstance(row, dict):
            raise PromptError(
                f"prompt source {name!r} row {i}: expected a string or a mapping, got {row!r}"
            )
        prompt = row.get(column)
        if not isinstance(prompt, str) or not prompt.strip():
            fields = ", ".join(map(str, row)) or "none"
            raise PromptError(
                f"prompt source {name!r} row {i}: no non-empty string under {column!r} "
                "(its fields: "
                f"{fields}); set the prompt column (prompts.prompt_column) to the field holding it"
            )
        prompts.append(prompt.strip())
        metadata.append({k: v for k, v in row.items() if k != column})
    has_fields = any(metadata)
    return PromptSource(name, prompts, metadata if has_fields else None)


def read_jsonl_prompts(path: str | Path, column: str = "prompt") -> PromptSource:
    """A JSON-lines file: one object a line (blank lines skipped), the prompt under ``column``."""
    rows = []
    for number, line in enumerate(_read_text(path, "JSONL prompt file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"JSONL prompt file {str(path)!r} line {number} is not JSON: {exc}"
            ) from None
    if not rows:
        raise PromptError(
            f"JSONL prompt file {str(path)!r} contains no rows (one JSON object a line)"
        )
    return rows_to_source(f"jsonl:{path}", rows, column)


def read_csv_prompts(path: str | Path, column: str = "prompt") -> PromptSource:
    """A CSV file with a header row; the prompt under ``column``, every other cell a string
    field."""
    reader = csv.DictReader(_read_text(path, "CSV prompt file").splitlines())
    if reader.fieldnames is None or column not in reader.fieldnames:
        header = ", ".join(reader.fieldnames or []) or "none"
        raise PromptError(
            f"CSV prompt file {str(path)!r} has no column {column!r} (header: {header}); set "
            "the prompt column (prompts.prompt_column)"
        )
    rows = list(reader)
    ragged = next((i for i, r in enumerate(rows, start=2) if None in r or None in r.values()), None)
    if ragged is not None:
        raise PromptError(
            f"CSV prompt file {str(path)!r} line {ragged} has a different number of "
            "cells than the header"
        )
    if not rows:
        raise PromptError(f"CSV prompt file {str(path)!r} contains no rows below its header")
    return rows_to_source(f"csv:{path}", rows, column)


def load_dataset_prompts(path: str, column: str = "prompt", split: str = "train") -> PromptSource:
    """A Hugging Face ``datasets`` dataset: a directory written by ``save_to_disk``, or anything
    ``datasets.load_dataset`` takes (hub id, directory of data files), split ``split``."""
    try:
        import datasets
    except ImportError:
        raise PromptError(
            "prompt source 'dataset' needs the `datasets` package: pip install "
            "'diffloop[datasets]' "
            "(or use source jsonl / csv)"
        ) from None
    local = Path(path).expanduser()
    saved = local.is_dir() and any(
        (local / f).is_file() for f in ("state.json", "dataset_dict.json")
    )
    try:
        data = (
            datasets.load_from_disk(str(local))
            if saved
            else datasets.load_dataset(path, split=split)
        )
    except Exception as exc:  # datasets raises many types (hub, file, format errors): one line each
        raise PromptError(f"dataset {path!r} (split {split!r}) could not be loaded: {exc}") from exc
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PromptError(
                f"dataset {path!r} has no split {split!r}; its splits: {', '.join(data)}"
            )
        data = data[split]
    if column not in data.column_names:
        raise PromptError(
            f"dataset {path!r} has no column {column!r} (columns: {', '.join(data.column_names)}); "
            "set the prompt column (prompts.prompt_column)"
        )
    return rows_to_source(f"dataset:{path}", list(data), column)


def _packaged(folder: str, filename: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        return parse_prompt_lines((_DATA / folder / filename).read_text(encoding="utf-8"))

    return load


def indefinite_article(noun: str) -> str:
    """ "an" before a vowel letter, else "a" (enough for DDPO's animal list; inflect is not
    needed)."""
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
_SPECIAL = ("list", *PATH_SOURCES, "shapes/<split>")
# British spelling of the T2I-CompBench category ("colour") -> the file name's.
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
    name: str,
    path: str | None = None,
    prompts: list[str] | None = None,
    *,
    column: str = "prompt",
    split: str = "train",
) -> PromptSource:
    """The prompt source ``name``: ``path`` for file/jsonl/csv/dataset (``column`` names the prompt
    field of the last three, ``split`` the dataset's split), ``prompts`` for "list" (module doc)."""
    if path is not None and name not in PATH_SOURCES:
        raise PromptError(
            f"prompts path={path!r} is only used with sources "
            f"{', '.join(PATH_SOURCES)}, not {name!r}"
        )
    if prompts is not None and name != "list":
        raise PromptError(f"inline prompts are only used with source 'list', not {name!r}")
    if name == "list":
        if not prompts:
            raise PromptError("prompt source 'list' needs a non-empty list of prompts")
        return PromptSource("list", list(prompts))
    if name in PATH_SOURCES and path is None:
        raise PromptError(f"prompt source {name!r} needs path=<{PATH_SOURCES[name]}>")
    if name == "file":
        return PromptSource(f"file:{path}", read_prompt_file(path))
    if name == "jsonl":
        return read_jsonl_prompts(path, column)
    if name == "csv":
        return read_csv_prompts(path, column)
    if name == "dataset":
        return load_dataset_prompts(path, column, split)
    if name.startswith("shapes/"):
        return PromptSource(name, _shapes_prompts(name[len("shapes/") :]))
    if _resolve_alias(name) in PROMPT_SOURCES:
        return PromptSource(_resolve_alias(name), PROMPT_SOURCES[_resolve_alias(name)]())
    names = available_prompt_sources()
    raise PromptError(
        f"unknown prompt source {name!r}.{did_you_mean(name, names)} Available: {', '.join(names)}"
    )


def training_prompt_source(p: PromptConfig) -> PromptSource:
    """The training prompts of a config's ``prompts`` section."""
    return build_prompt_source(p.source, p.path, p.prompts, column=p.prompt_column, split=p.split)


def eval_prompt_source(config: Config) -> PromptSource | None:
    """The held-out prompts of ``eval`` (None when eval.prompts is null); eval.prompt_column null
    reads the training prompts' column."""
    e = config.eval
    if not e.prompts:
        return None
    column = e.prompt_column or config.prompts.prompt_column
    return build_prompt_source(e.prompts, e.path, column=column, split=e.split)
