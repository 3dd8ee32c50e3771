"""Prompt datasets with metadata: JSONL, CSV and Hugging Face ``datasets`` sources, their errors,
and the rows' fields reaching the reward in training and in evaluation."""

from __future__ import annotations

import importlib.util
import json

import pytest

from diffloop.cli import main
from diffloop.config import ConfigError, load_config
from diffloop.preflight import check_before_loading
from diffloop.prompts import PromptError, build_prompt_source
from diffloop.run_dir import read_metrics

HAS_DATASETS = importlib.util.find_spec("datasets") is not None

GENEVAL = [  # GenEval-style rows: objects to find, a task tag
    {
        "prompt": "a red circle",
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
    },
    {"prompt": "a blue square", "tag": "colors", "include": [{"class": "square", "count": 1}]},
    {"prompt": "a green triangle", "tag": "colors", "include": [{"class": "triangle", "count": 1}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_rows_keep_their_fields_and_draws_stay_pure(tmp_path):
    source = build_prompt_source("jsonl", path=str(write_jsonl(tmp_path / "p.jsonl", GENEVAL)))
    assert source.prompts == [r["prompt"] for r in GENEVAL]
    assert source.fields(1) == {"tag": "colors", "include": [{"class": "square", "count": 1}]}
    source.fields(1)["tag"] = "changed"  # a reward changing its metadata does not change the source
    assert source.fields(1)["tag"] == "colors"
    idx = source.draw(8, seed=3, epoch=2)
    assert idx == source.draw(8, seed=3, epoch=2) and source.sample(8, 3, 2) == [
        source.prompts[i] for i in idx
    ]
    # the same draw as a plain list of the same length: adding metadata moves no prompt
    assert build_prompt_source("list", prompts=source.prompts).sample(8, 3, 2) == source.sample(
        8, 3, 2
    )


def test_csv_rows_and_a_configurable_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "text,category\nan orange cat,color\na cube left of a ball,spatial\n", encoding="utf-8"
    )
    source = build_prompt_source("csv", path=str(path), column="text")
    assert source.prompts == ["an orange cat", "a cube left of a ball"]
    assert [source.fields(i) for i in range(2)] == [{"category": "color"}, {"category": "spatial"}]
    with pytest.raises(
        PromptError, match=r"no column 'prompt' \(header: text, category\).*prompts.prompt_column"
    ):
        build_prompt_source("csv", path=str(path))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "a cat"}\n{not json\n', "line 2 is not JSON"),
        (
            "p.jsonl",
            '{"prompt": "a cat"}\n{"caption": "a dog"}\n',
            r"row 2: no non-empty string under 'prompt' \(its fields: caption\)",
        ),
        (
            "p.jsonl",
            '{"prompt": "a cat", "epoch": 3}\n',
            "field 'epoch' is a name diffloop gives the reward itself",
        ),
        ("p.jsonl", "\n\n", "contains no rows"),
        ("p.csv", "prompt,tag\na cat,x\na dog\n", "line 3 has a different number of cells"),
        ("p.csv", "prompt,tag\n", "contains no rows below its header"),
    ],
)
def test_file_errors_name_the_file_and_row(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptError, match=message):
        build_prompt_source(name.split(".")[1], path=str(path))


def test_config_checks_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="prompts.source=jsonl needs prompts.path="):
        load_config(None, [f"output_dir={tmp_path}", "prompts.source=jsonl"])
    with pytest.raises(ConfigError, match="eval.prompts=csv needs eval.path="):
        load_config(None, [f"output_dir={tmp_path}", "eval.prompts=csv"])
    with pytest.raises(
        ConfigError, match="eval.path=x.jsonl is only read by eval.prompts=file/jsonl/csv/dataset"
    ):
        load_config(
            None, [f"output_dir={tmp_path}", "eval.prompts=shapes/val_pair", "eval.path=x.jsonl"]
        )
    missing = load_config(
        None,
        [f"output_dir={tmp_path}", "prompts.source=jsonl", f"prompts.path={tmp_path}/no.jsonl"],
    )
    with pytest.raises(
        ConfigError, match="prompts.source=jsonl: JSONL prompt file .* does not exist"
    ):
        check_before_loading(missing)


@pytest.mark.skipif(HAS_DATASETS, reason="datasets is installed")
def test_dataset_source_without_datasets_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(
        PromptError, match=r"needs the `datasets` package: pip install 'diffloop\[datasets\]'"
    ):
        build_prompt_source("dataset", path="some/hub-id")
    args = [
        "check-config",
        f"output_dir={tmp_path / 'run'}",
        "prompts.source=dataset",
        "prompts.path=org/prompts",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts.source=dataset" in err[0] and "diffloop[datasets]" in err[0]


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets is not installed")
def test_dataset_saved_to_disk_loads_with_its_columns(tmp_path):
    import datasets

    datasets.Dataset.from_list(GENEVAL).save_to_disk(str(tmp_path / "ds"))
    source = build_prompt_source("dataset", path=str(tmp_path / "ds"))
    assert source.prompts == [r["prompt"] for r in GENEVAL]
    assert source.fields(0)["tag"] == "single_object"
    with pytest.raises(PromptError, match="has no column 'caption'"):
        build_prompt_source("dataset", path=str(tmp_path / "ds"), column="caption")


class Recorder:
    """A reward that keeps every (prompt, metadata) pair it was asked to score."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, images, prompts, metadata):
        self.calls += list(zip(prompts, metadata))
        return images.mean(dim=(1, 2, 3))


def test_the_reward_gets_each_rows_fields_in_training_and_evaluation(tmp_path):
    from diffloop.trainer import Trainer

    train = write_jsonl(tmp_path / "train.jsonl", GENEVAL)
    held_out = write_jsonl(
        tmp_path / "val.jsonl",
        [{"prompt": "a red square", "tag": "held_out", "objects": ["square"]}],
    )
    config = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "num_epochs=1", "sample.num_steps=2",
        "sample.prompts_per_epoch=2",
        "sample.samples_per_prompt=2", "train.batch_size=4", "logging.progress_bars=false",
        "logging.report_to=none",
        "prompts.source=jsonl", f"prompts.path={train}", "eval.prompts=jsonl",
        f"eval.path={held_out}",
        "eval.num_prompts=2", "eval.samples_per_prompt=1",
    ])  # fmt: skip
    reward = Recorder()
    Trainer(config, reward=reward).train()
    by_prompt = {r["prompt"]: {k: v for k, v in r.items() if k != "prompt"} for r in GENEVAL}
    training = [(p, m) for p, m in reward.calls if "epoch" in m]
    evaluation = [(p, m) for p, m in reward.calls if "prompt_index" in m]
    assert len(training) == 4 and len(evaluation) == 4  # base and final evaluation, 2 prompts each
    for prompt, meta in training:
        assert meta == {**by_prompt[prompt], "epoch": 0, "sample_index": meta["sample_index"]}
    assert sorted(m["sample_index"] for _, m in training) == [0, 1, 2, 3]
    for prompt, meta in evaluation:
        assert prompt == "a red square"
        assert meta == {
            "tag": "held_out",
            "objects": ["square"],
            "prompt_index": meta["prompt_index"],
            "image_index": 0,
        }
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [-1, 0]
