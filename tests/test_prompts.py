"""Prompt sources: packaged lists match their files, seeded sampling, file errors, unknown names."""

from __future__ import annotations

import importlib.resources
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from diffloop.errors import DiffloopError
from diffloop.prompts import (
    PromptError,
    PromptSource,
    available_prompt_sources,
    build_prompt_source,
)

DATA = Path(__file__).resolve().parents[1] / "src" / "diffloop" / "data"


def _expected(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _packaged_files() -> list[tuple[str, Path]]:
    ddpo = [(f"ddpo/{p.stem}", p) for p in sorted((DATA / "ddpo-prompts").glob("*.txt"))]
    t2i = [(f"t2i-compbench/{p.stem}", p) for p in sorted((DATA / "t2i-compbench").glob("*.txt"))]
    return ddpo + t2i


def test_every_packaged_file_is_a_source_with_its_lines() -> None:
    files = _packaged_files()
    assert len(files) == 3 + 22  # DDPO 3; T2I-CompBench 8 categories x train/val (+ seen/unseen)
    for name, path in files:
        assert name in available_prompt_sources()
        assert build_prompt_source(name).prompts == _expected(path), name


def test_known_counts_and_licences_ship() -> None:
    counts = {
        "ddpo/simple_animals": 45,
        "ddpo/activities": 3,
        "ddpo/imagenet_classes": 1000,
        "t2i-compbench/color_train": 700,
        "t2i-compbench/shape_val_unseen": 100,
    }
    for name, count in counts.items():
        assert len(build_prompt_source(name)) == count, name
    assert build_prompt_source("ddpo/activities").prompts[0] == "washing the dishes"
    data = importlib.resources.files("diffloop") / "data"
    assert (data / "ddpo-prompts" / "LICENSE").is_file()
    assert (data / "t2i-compbench" / "LICENSE").is_file()


def test_sample_is_a_pure_function_of_seed_and_epoch() -> None:
    source = build_prompt_source("ddpo/simple_animals")
    # a fresh source drawing epoch 3 directly equals one that drew epochs 0..2 first (resume)
    for epoch in range(3):
        source.sample(16, seed=7, epoch=epoch)
    fresh = build_prompt_source("ddpo/simple_animals")
    assert source.sample(16, seed=7, epoch=3) == fresh.sample(16, seed=7, epoch=3)
    # the documented draw: indices from default_rng([seed, epoch]), with replacement
    idx = np.random.default_rng([7, 3]).integers(0, 45, size=16)
    assert fresh.sample(16, seed=7, epoch=3) == [fresh.prompts[i] for i in idx]
    draws = {tuple(fresh.sample(16, seed=7, epoch=e)) for e in range(5)}
    assert len(draws) == 5  # each epoch draws a different list
    assert fresh.sample(16, seed=8, epoch=3) != fresh.sample(16, seed=7, epoch=3)
    assert fresh.sample(0, seed=7, epoch=3) == []


def test_sample_is_uniform_with_replacement() -> None:
    source = PromptSource("abc", ["a", "b", "c"])
    counts = Counter(source.sample(30_000, seed=0, epoch=0))
    # binomial std of a frequency is sqrt(p (1 - p) / n) = 0.0027; 0.015 is > 5 std
    assert all(abs(counts[p] / 30_000 - 1 / 3) < 0.015 for p in "abc")
    assert len(source.sample(10, seed=0, epoch=1)) == 10  # more than len: with replacement


def test_iterate_fixed_cycles_in_order() -> None:
    source = build_prompt_source("list", prompts=["a", "b", "c"])
    assert source.iterate_fixed(7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert source.iterate_fixed(3) == ["a", "b", "c"]


def test_iterate_fixed_spreads_a_subset_over_the_whole_list() -> None:
    source = build_prompt_source("list", prompts=[str(i) for i in range(10)])
    assert source.iterate_fixed(4) == ["0", "2", "5", "7"]  # floor(i * 10 / 4)
    assert source.iterate_fixed(1) == ["0"]
    assert source.iterate_fixed(0) == []


def test_default_evaluation_covers_seen_and_unseen_combinations() -> None:
    from diffloop.config import Config
    from diffloop.shapes.world import uses_unseen_combination

    e = Config().eval
    prompts = build_prompt_source(e.prompts).iterate_fixed(e.num_prompts)
    unseen = sum(uses_unseen_combination(p) for p in prompts)
    assert 0 < unseen < len(prompts), (unseen, len(prompts))


def test_file_source_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\n  a red cube  \n#a comment\nblue sphere\n\n", encoding="utf-8")
    source = build_prompt_source("file", path=str(path))
    assert source.prompts == ["a red cube", "blue sphere"]
    assert source.name == f"file:{path}"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.write_text("# only a comment\n\n   \n"), "contains no prompts"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not readable UTF-8"),
        (lambda p: p.write_bytes(b""), "contains no prompts"),
        (lambda p: p.write_bytes(b"\x00" * 64), "line 1 contains the control character NUL"),
        (
            lambda p: p.write_bytes(b"a cat\nPK\x03\x04zip"),
            "line 2 contains the control character U[+]0003",
        ),
    ],
)
def test_file_errors_name_the_path(tmp_path: Path, setup, message: str) -> None:
    path = tmp_path / "prompts.txt"
    setup(path)
    with pytest.raises(PromptError, match=message) as info:
        build_prompt_source("file", path=str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, DiffloopError) and isinstance(info.value, ValueError)


def test_tabs_inside_prompts_are_text(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\tsitting\n")
    assert build_prompt_source("file", path=str(path)).prompts == ["a cat\tsitting"]


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="needs path="):
        build_prompt_source("file")
    with pytest.raises(ValueError, match="non-empty list"):
        build_prompt_source("list", prompts=[])
    with pytest.raises(ValueError, match="must be str"):
        build_prompt_source("list", prompts=["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="only used with sources file, jsonl, csv, dataset"):
        build_prompt_source("ddpo/activities", path="x.txt")
    with pytest.raises(ValueError, match="only used with source 'list'"):
        build_prompt_source("file", path="x.txt", prompts=["a"])


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match="Did you mean 'ddpo/simple_animals'") as info:
        build_prompt_source("ddpo/simple_animal")
    assert "t2i-compbench/color_train" in str(info.value) and "shapes/<split>" in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 't2i-compbench/shape_val_unseen'"):
        build_prompt_source("t2i-compbench/shape_val_unsen")


def test_shapes_splits_resolve_lazily() -> None:
    from diffloop.shapes.world import prompt_splits

    splits = prompt_splits()
    assert build_prompt_source("shapes/train").prompts == splits["train"]
    with pytest.raises(ValueError, match="Did you mean 'train'"):
        build_prompt_source("shapes/trian")


T2I_CATEGORIES = (
    "color",
    "shape",
    "texture",
    "spatial",
    "non_spatial",
    "complex",
    "numeracy",
    "3d_spatial",
)
SEEN_UNSEEN = (
    "color",
    "shape",
    "texture",
)  # the attribute-binding categories have val_seen / val_unseen


def test_t2i_compbench_name_pattern_reaches_every_file() -> None:
    # <category>_<split> over T2I-CompBench's categories and splits names exactly the shipped files
    pairs = [(c, s) for c in T2I_CATEGORIES for s in ("train", "val")]
    pairs += [(c, s) for c in SEEN_UNSEEN for s in ("val_seen", "val_unseen")]
    shipped = {f"t2i-compbench/{p.stem}" for p in (DATA / "t2i-compbench").glob("*.txt")}
    assert {f"t2i-compbench/{c}_{s}" for c, s in pairs} == shipped and len(pairs) == 22
    counts = {
        "train": 700,
        "val": 300,
        "val_seen": 200,
        "val_unseen": 100,
    }  # T2I-CompBench's splits
    for c, s in pairs:
        assert len(build_prompt_source(f"t2i-compbench/{c}_{s}")) == counts[s], (c, s)


def test_colour_is_an_alias_of_color() -> None:
    for split in ("train", "val", "val_seen", "val_unseen"):
        alias = build_prompt_source(f"t2i-compbench/colour_{split}")
        assert alias.name == f"t2i-compbench/color_{split}"
        assert alias.prompts == build_prompt_source(f"t2i-compbench/color_{split}").prompts


def test_animals_activities_is_ddpo_cross_product() -> None:
    source = build_prompt_source("ddpo/animals_activities")
    assert "ddpo/animals_activities" in available_prompt_sources()
    assert len(source) == 45 * 3
    # DDPO: f"{IE.a(animal)} {activity}"; "ant" is the list's only vowel-initial animal
    assert source.prompts[:4] == [
        "a cat washing the dishes",
        "a cat riding a bike",
        "a cat playing chess",
        "a dog washing the dishes",
    ]
    assert [p for p in source.prompts if p.startswith("an ")] == [
        "an ant washing the dishes",
        "an ant riding a bike",
        "an ant playing chess",
    ]
    assert len(set(source.prompts)) == 135


def test_shapes_split_counts() -> None:
    counts = {
        "train_single": 72,
        "train_pair": 404,
        "train": 476,
        "val_single": 12,
        "val_seen": 100,
        "val_unseen": 216,
        "val_pair": 316,
        "val": 328,
    }
    for split, count in counts.items():
        assert len(build_prompt_source(f"shapes/{split}")) == count, split


def test_sampling_resumes_where_it_stopped() -> None:
    # epochs 0..5 drawn in one go equal epochs 0..2, then a fresh process (new source) drawing 3..5
    whole = build_prompt_source("ddpo/animals_activities")
    uninterrupted = [whole.sample(8, seed=3, epoch=e) for e in range(6)]
    first = build_prompt_source("ddpo/animals_activities")
    before = [first.sample(8, seed=3, epoch=e) for e in range(3)]
    resumed = build_prompt_source("ddpo/animals_activities")
    after = [resumed.sample(8, seed=3, epoch=e) for e in range(3, 6)]
    assert before + after == uninterrupted
