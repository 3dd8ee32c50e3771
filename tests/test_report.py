"""``diffloop report``: a self-contained HTML page with plots, grids and configs, rendered headless.

The rendering test needs Debian's chromium: ``scripts/install_test_deps.sh`` installs it (for CI).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffloop.cli import main as cli_main
from diffloop.tools.report import report_main, series, unique_names, x_offset

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours: run 1, run 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A real 2-epoch shapes run with evaluation grids, and a synthetic run with monitor keys."""
    root = tmp_path_factory.mktemp("report")
    real = root / "real_run"
    overrides = {
        "output_dir": real,
        "num_epochs": 2,
        "sample.num_steps": 3,
        "sample.prompts_per_epoch": 2,
        "sample.samples_per_prompt": 2,
        "sample.batch_size": 4,
        "train.batch_size": 4,
        "train.learning_rate": 0.05,
        "train.clip_range": 0.2,
        "eval.prompts": "shapes/val_pair",
        "eval.num_prompts": 2,
        "eval.samples_per_prompt": 2,
        "eval.every_n_epochs": 1,
        "logging.progress_bars": False,
        "logging.tensorboard": False,
    }
    assert cli_main(["train", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    synthetic = root / "synthetic_run"
    synthetic.mkdir()
    shutil.copy(real / "config.yaml", synthetic / "config.yaml")
    rows = [{"epoch": -1, "eval_reward_mean": 0.2, "eval_reward_std": 0.1}]
    for e in range(3):
        rows.append(
            {
                "epoch": e,
                "reward_mean": 0.1 * e,
                "reward_std": 0.05,
                "approx_kl": 1e-3 * e,
                "clipfrac": 0.1,
                "ratio_mean": 1.0,
                "grad_norm": 0.5,
                "reward_group_std_mean": 0.02,
                "reward_zero_spread_groups": 0.25,
                "monitor_brightness": 0.5 + 0.01 * e,
                "monitor_group_diversity": 0.3,
                "kl_to_base": 0.01 * e,
                "reward_clip_score_mean": 0.3,
                "eval_reward_mean": 0.3 + 0.1 * e,
                "eval_reward_std": 0.1,
            }
        )
    (synthetic / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return real, synthetic


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.pre: list[str] = []
        self._in_pre = False

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs))
        self._in_pre = tag == "pre" or self._in_pre

    def handle_endtag(self, tag) -> None:
        self._in_pre = self._in_pre and tag != "pre"

    def handle_data(self, data) -> None:
        if self._in_pre:
            self.pre.append(data)


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    raw = base64.b64decode(src[len(prefix) :], validate=True)
    Image.open(io.BytesIO(raw)).verify()  # a valid PNG (checksums included)
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG"
    return image.convert("RGB")


def has_colour(
    image: Image.Image, rgb: tuple[int, int, int], tol: int = 10, min_pixels: int = 20
) -> bool:
    diff = np.abs(np.asarray(image, dtype=int) - np.array(rgb)).max(axis=-1)
    return int((diff <= tol).sum()) >= min_pixels


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report.html"
    assert report_main([str(runs[0]), str(runs[1]), "--output", str(out)]) == 0
    return out


def test_x_axis_is_epochs_completed() -> None:
    rows = [
        {"epoch": -1, "eval_reward_mean": 0.1},
        {
            "epoch": 0,
            "reward_mean": 0.2,
            "approx_kl": 0.3,
            "eval_reward_mean": 0.4,
            "monitor_brightness": True,
        },
    ]
    assert series(rows, "eval_reward_mean") == ([0, 1], [0.1, 0.4])  # base row -> 0
    assert series(rows, "reward_mean") == ([0], [0.2])  # samples of epoch 0: the base policy
    assert series(rows, "approx_kl") == ([1], [0.3])  # the update that completed epoch 1
    assert series(rows, "monitor_brightness") == ([], [])  # not a number
    assert x_offset("kl_to_base") == 0 and x_offset("grad_norm") == 1


def test_unique_names(tmp_path) -> None:
    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert unique_names([a, b, tmp_path / "z"]) == ["x/run", "y/run", "z"]
    assert unique_names([a, a]) == ["x/run#1", "x/run#2"]


def test_report_is_self_contained_with_plots_grids_and_configs(runs, report) -> None:
    text = report.read_text()
    parser = Images()
    parser.feed(text)
    images = {
        img.get("alt"): decode_png(img["src"]) for img in parser.imgs
    }  # every <img> a data: PNG
    assert len(images) == len(parser.imgs)
    plots = {
        "reward_mean",
        "eval_reward_mean",
        "approx_kl",
        "clipfrac",
        "ratio_mean",
        "grad_norm",
        "reward_group_std_mean",
        "reward_zero_spread_groups",
        "monitor_brightness",
        "monitor_group_diversity",
        "kl_to_base",
        "reward_clip_score_mean",
    }
    assert plots <= set(images)
    # both runs on the same axes where both logged the key; only the synthetic run has kl_to_base
    for key in ("reward_mean", "eval_reward_mean", "approx_kl"):
        assert has_colour(images[key], C0) and has_colour(images[key], C1), key
    assert has_colour(images["kl_to_base"], C1) and not has_colour(images["kl_to_base"], C0)
    # PNG plots are also written next to the report, identical to the embedded ones
    plot_dir = report.with_name("report_plots")
    for key in plots:
        assert np.array_equal(
            np.asarray(Image.open(plot_dir / f"{key}.png").convert("RGB")), images[key]
        )
    # before / after grids of the real run: eval/base.png and eval/epoch_0002.png
    before, after = images["before training (base model)"], images["after epoch 2"]
    assert np.array_equal(
        np.asarray(before), np.asarray(Image.open(runs[0] / "eval" / "base.png").convert("RGB"))
    )
    assert np.array_equal(
        np.asarray(after),
        np.asarray(Image.open(runs[0] / "eval" / "epoch_0002.png").convert("RGB")),
    )
    # the resolved configs, verbatim
    config = (runs[0] / "config.yaml").read_text()
    assert "".join(parser.pre).count(config) == 2
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    assert "real_run" in text and "synthetic_run" in text


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, (
        "chromium is not installed: run scripts/install_test_deps.sh (apt-get install chromium)"
    )
    return path


def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    flags = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    page = Image.open(shot).convert("RGB")
    assert page.size == (1200, 2000)
    pixels = np.asarray(page, dtype=int)
    assert (pixels.min(axis=-1) < 200).mean() > 0.03  # text, tables and plots, not a blank page
    assert has_colour(page, C0, min_pixels=50) and has_colour(page, C1, min_pixels=50)  # plot lines
    # every image decodes in the browser: a copy of the page counts loaded images after 'load'
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load',()=>{const i=[...document.images];const d=document."
        "createElement('div');d.id='probe';d.textContent=i.filter(x=>x.complete&&x.naturalWidth>0)"
        ".length+'/'+i.length;document.body.appendChild(d)})</script></body>"
    )
    probe.write_text(report.read_text().replace("</body>", script))
    dom = subprocess.run(
        [*flags, "--dump-dom", probe.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    parser = Images()
    parser.feed(report.read_text())
    n = len(parser.imgs)
    assert n >= 14 and f'<div id="probe">{n}/{n}</div>' in dom


def test_not_a_run_directory(tmp_path, capsys) -> None:
    assert report_main([str(tmp_path), "--output", str(tmp_path / "r.html")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_config_is_escaped(runs, tmp_path) -> None:
    run = tmp_path / "weird"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: '<b>x</b> & y'\n")
    out = tmp_path / "r.html"
    assert report_main([str(run), "--output", str(out)]) == 0
    text = out.read_text()
    assert html.escape("output_dir: '<b>x</b> & y'") in text and "<b>x</b>" not in text


# A metrics.jsonl as the trainer wrote it in December 2026 (3 epochs, a composite reward, KL to
# base, evaluation every epoch): later versions must keep reading it.
OLD_METRICS = Path(__file__).resolve().parent / "fixtures" / "metrics_2026-12.jsonl"


def test_old_and_tensorboard_style_metrics_read_alike(runs, tmp_path) -> None:
    """A run written with flat keys and the same run with namespaced aliases (reward/mean) give the
    same rows and the same plots; a key the schema does not know is named on the page, not
    plotted."""
    from diffloop.metrics import tensorboard_tag
    from diffloop.tools.report import load_run

    rows = [json.loads(line) for line in OLD_METRICS.read_text().splitlines()]
    aliased = [
        {("epoch" if k == "epoch" else tensorboard_tag(k)): v for k, v in r.items()} for r in rows
    ]
    aliased[1]["ratio_max_dev"] = 0.5  # an undeclared key (another version's)
    dirs = []
    for name, content in (("flat", rows), ("aliased", aliased)):
        run = tmp_path / name
        run.mkdir()
        shutil.copy(runs[0] / "config.yaml", run / "config.yaml")
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))
        dirs.append(run)
    flat, alias = load_run(dirs[0]), load_run(dirs[1])
    assert alias.rows[1].pop("ratio_max_dev") == 0.5
    assert alias.rows == flat.rows == rows
    pages = []
    for run in dirs:
        out = tmp_path / f"{run.name}.html"
        assert report_main([str(run), "--output", str(out)]) == 0
        parser = Images()
        parser.feed(out.read_text())
        pages.append((out.read_text(), {img["alt"] for img in parser.imgs}))
    (flat_page, flat_plots), (alias_page, alias_plots) = pages
    expected = {"reward_mean", "eval_reward_mean", "approx_kl", "clipfrac", "kl_to_base",
                "monitor_group_diversity", "reward_reward_fns:brightness_1_mean"}  # fmt: skip
    assert expected <= flat_plots and alias_plots == flat_plots
    assert "<code>ratio_max_dev</code>" in alias_page and "ratio_max_dev" not in flat_page
    assert "ratio_max_dev" not in alias_plots


# ---------------------------------------------------------------------------- what a newcomer reads


def test_labelled_images_breakdown_and_standard_errors(runs, report) -> None:
    """The real run's eval/<tag>.npz images appear with their prompts and scores, its
    before_after.png is embedded, the held-out breakdown and mean +- s.e. match metrics.jsonl."""
    real = runs[0]
    text = report.read_text()
    parser = Images()
    parser.feed(text)
    images = {img["alt"]: img["src"] for img in parser.imgs}
    figure = decode_png(images["real_run: before / after"])
    expected = Image.open(real / "eval" / "before_after.png").convert("RGB")
    assert np.array_equal(np.asarray(figure), np.asarray(expected))
    for tag, caption in (("base", "before training (base model)"), ("epoch_0002", "after epoch 2")):
        data = np.load(real / "eval" / f"{tag}.npz")
        k = len(data["images"]) // len(data["prompts"])
        assert k == 2 and len(data["prompts"]) == 2
        for i, (image, score) in enumerate(zip(data["images"], data["scores"], strict=True)):
            alt = f"real_run, {caption}, prompt {i // k + 1} image {i % k + 1}: score {score:.3f}"
            assert np.array_equal(np.asarray(decode_png(images[alt])), image.transpose(1, 2, 0))
        for prompt in data["prompts"]:
            assert f"<td class='prompt'>{html.escape(str(prompt))}</td>" in text
    rows = [json.loads(line) for line in (real / "metrics.jsonl").read_text().splitlines()]
    base, last = rows[0], rows[-1]
    assert base["epoch"] == -1 and last["epoch"] == 1
    for key in ("eval_binding_colour_mean", "eval_binding_shape_mean", "eval_reward_mean"):
        assert f"{base[key]:.4g} &rarr; {last[key]:.4g}" in text, key
    assert "colour binding" in text and "shape binding" in text
    n = 2 * 2  # eval.num_prompts x eval.samples_per_prompt
    se = base["eval_reward_std"] / (n - 1) ** 0.5  # population std -> standard error
    assert f"<td>{base['eval_reward_mean']:.4g} &plusmn; {se:.4g}</td>" in text
    assert "no evaluation images" in text  # the synthetic run has no eval/ folder: said so


def rendered_boxes(flags: list[str], page: Path) -> dict:
    """Page height and, per <img>, its box on the page, whether it is a plot or a labelled
    evaluation image, and its decoded width: measured by a script in ``page`` after 'load'."""
    dom = subprocess.run(
        [*flags, "--window-size=1200,1000", "--dump-dom", page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'<pre id="boxes">(.*?)</pre>', dom, re.DOTALL)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


BOX_SCRIPT = """<script>addEventListener('load', () => {
  const imgs = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {alt: i.alt, plot: !!i.closest('.plots'), labelled: !!i.closest('table.labelled'),
            x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            nw: i.naturalWidth}; });
  const out = {height: document.documentElement.scrollHeight, imgs};
  const pre = document.createElement('pre'); pre.id = 'boxes';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre); });</script></body>"""


def test_every_plot_and_labelled_image_renders_non_empty(runs, report, tmp_path) -> None:
    """A full-page screenshot (folded sections opened): each plot's box holds its runs' line
    colours (the held-out reward also its two standard-error bands), each labelled evaluation
    image is drawn 96 px square with the npz pixels (3x nearest-neighbour)."""
    flags = [chromium(), *CHROMIUM_FLAGS, "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    page = tmp_path / "page.html"
    page.write_text(
        report.read_text().replace("<details>", "<details open>").replace("</body>", BOX_SCRIPT)
    )
    boxes = rendered_boxes(flags, page)
    shot = tmp_path / "full.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", f"--window-size=1200,{boxes['height']}", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    screen = Image.open(shot).convert("RGB")
    assert screen.size == (1200, boxes["height"])

    def crop(box: dict) -> Image.Image:
        x, y = round(box["x"]), round(box["y"])
        return screen.crop((x, y, x + round(box["w"]), y + round(box["h"])))

    plots = {b["alt"]: b for b in boxes["imgs"] if b["plot"]}
    assert {"reward_mean", "eval_reward_mean", "approx_kl", "clipfrac", "ratio_mean",
            "kl_to_base"} <= set(plots)  # fmt: skip
    for key, box in plots.items():
        assert box["w"] > 300 and box["h"] > 150 and box["nw"] > 0, key
        area = crop(box)
        assert has_colour(area, C0) or has_colour(area, C1), f"{key}: no line drawn"
    for key in ("reward_mean", "eval_reward_mean"):  # both runs on the same axes
        assert has_colour(crop(plots[key]), C0) and has_colour(crop(plots[key]), C1), key
    band0, band1 = (210, 228, 240), (255, 229, 207)  # C0 / C1 at alpha 0.2 over white
    held_out = crop(plots["eval_reward_mean"])
    assert has_colour(held_out, band0, tol=6, min_pixels=50)
    assert has_colour(held_out, band1, tol=6, min_pixels=50)
    labelled = [b for b in boxes["imgs"] if b["labelled"]]
    assert len(labelled) == 8  # 2 prompts x 2 images x (base, epoch 2)
    data = np.load(runs[0] / "eval" / "base.npz")
    for box in labelled:
        assert (box["w"], box["h"]) == (96, 96) and box["nw"] == 32, box["alt"]
    first = next(b for b in labelled if b["alt"].startswith("real_run, before training"))
    drawn = np.asarray(crop(first), dtype=float)
    expected = data["images"][0].transpose(1, 2, 0).repeat(3, axis=0).repeat(3, axis=1)
    assert np.abs(drawn - expected).mean() < 3


def test_labelled_table_is_capped_and_a_damaged_npz_is_named(runs, tmp_path) -> None:
    """An .npz holding every evaluation prompt shows its first TABLE_ROWS prompts and says so; an
    .npz that is not one grid is named on the page, not dropped silently."""
    from diffloop.tools.report_page import TABLE_ROWS

    run = tmp_path / "many"
    (run / "eval").mkdir(parents=True)
    shutil.copy(runs[0] / "config.yaml", run / "config.yaml")
    p = TABLE_ROWS + 8
    rng = np.random.default_rng(0)
    np.savez_compressed(run / "eval" / "base.npz",
                        prompts=np.array([f"prompt {i}" for i in range(p)]),
                        images=rng.integers(0, 256, (p, 3, 8, 8), dtype=np.uint8),
                        scores=np.linspace(0, 1, p))  # fmt: skip
    np.savez_compressed(run / "eval" / "epoch_0003.npz", prompts=np.array(["a", "b"]),
                        images=np.zeros((3, 3, 8, 8), np.uint8), scores=np.zeros(3))  # fmt: skip
    out = tmp_path / "r.html"
    assert report_main([str(run), "--output", str(out)]) == 0
    text = out.read_text()
    parser = Images()
    parser.feed(text)
    assert len(parser.imgs) == TABLE_ROWS  # one image per prompt, the first TABLE_ROWS prompts
    assert f"the first {TABLE_ROWS} of {p} prompts" in text
    assert f"prompt {TABLE_ROWS - 1}</td>" in text and f"prompt {TABLE_ROWS}</td>" not in text
    assert "epoch_0003.npz not shown" in text and "do not describe one grid" in text
