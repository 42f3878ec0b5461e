"""Run reports: sections found from saved files, a self-contained HTML page, and Chromium
rendering it with every plot image loaded."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from prefalign.report import (
    classify,
    demo_curves,
    merge_reports,
    report_cli,
    scan_run,
    write_run_report,
)

CHROMIUM = "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def save_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=50)
    plt.close(fig)


def training_records(scale: float = 1.0) -> list[dict]:
    out = []
    for step in range(1, 9):
        r = {"step": step, "loss": 0.7 / step, "rewards/margins": 0.1 * step * scale, "lr": 1e-4}
        if step % 4 == 0:
            r |= {"eval/gold_reward": 0.1 * step * scale, "eval/kl": 0.5 * step}
        out.append(r)
    # A resumed run logs step 8 again: the report keeps one row per step.
    return out + [
        {"step": 8, "loss": 0.05, "rewards/margins": 0.9, "eval/gold_reward": 0.85, "eval/kl": 4.2}
    ]


def demo_results() -> dict:
    """The demo's results.json shape, with the GenARM and ReST rows as their demos write them."""
    genarm_sweep = [
        {
            "alpha": a,
            "gold_reward": 0.2 + a,
            "gold_reward_se": 0.01,
            "kl": 2 * a,
            "brevity": 0.9 - a / 2,
        }
        for a in (0.0, 0.5, 1.0)
    ]
    tradeoff = [
        {"weights": [ws, 1 - ws], "sentiment": 0.2 + ws / 2, "brevity": 0.9 - ws / 3, "kl": ws}
        for ws in (0.0, 0.5, 1.0)
    ]
    return {
        "seconds": 123.4,
        "quick": True,
        "tasks": {
            "sentiment": {
                "world": "/tmp/world",
                "build": {"parameters": 1234},
                "methods": {
                    "sft": {"gold_reward": 0.1, "gold_reward_se": 0.02, "kl": 0.0, "seconds": 3.0},
                    "dpo": {
                        "gold_reward": 0.4,
                        "kl": 1.5,
                        "seconds": 30.0,
                        "sweep": [
                            {"beta": 0.3, "gold_reward": 0.3, "kl": 0.8},
                            {"beta": 0.1, "gold_reward": 0.4, "kl": 1.5},
                            {"beta": 0.05, "gold_reward": 0.45, "kl": 2.9},
                        ],
                    },
                    "genarm": {
                        "gold_reward": 0.7,
                        "kl": 1.0,
                        "seconds": 20.0,
                        "alpha": 0.5,
                        "sweep": genarm_sweep,
                        "tradeoff": tradeoff,
                        "arm": {"pair_accuracy": 0.7},
                        "base": {"gold_reward": 0.2},
                    },
                },
            },
            "arith": {
                "methods": {
                    "sft": {"gold_reward": 0.3, "kl": 0.0, "accuracy": 0.25, "seconds": 2.0},
                    "rest": {
                        "gold_reward": 0.6,
                        "kl": 2.0,
                        "accuracy": 0.5,
                        "seconds": 40.0,
                        "plot": "rest_arith_steps.png",
                    },
                }
            },
        },
    }


def rest_records() -> list[dict]:
    """steps.jsonl of `prefalign rest`: one record per initial / grow / improve step."""
    out = [
        {"kind": "initial", "eval": {"gold_reward": 0.3, "reward": 0.3, "kl": 0.0, "accuracy": 0.2}}
    ]
    for g in range(2):
        out.append(
            {
                "kind": "grow",
                "grow": g,
                "samples": 64,
                "reward": {"mean": 0.3 + g / 10, "p10": 0.1, "p90": 0.6},
            }
        )
        for i in range(2):
            out.append(
                {
                    "kind": "improve",
                    "grow": g,
                    "improve": i,
                    "threshold": 0.5 + i / 10,
                    "kept_fraction": 0.4 - i / 10,
                    "loss_last": 1.0 - g / 10,
                    "eval": {"gold_reward": 0.4 + g / 10, "kl": 1.0 + g, "accuracy": 0.3},
                }
            )
    return out


def make_demo_dir(run: Path) -> Path:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(demo_results()))
    save_png(run / "sentiment_reward_vs_kl.png")  # the demo's own plot: redrawn, not shown twice
    save_png(run / "extra" / "attention.png")
    save_png(run / "runs" / "sentiment" / "dpo-beta0.1" / "checkpoints" / "step-8" / "ignored.png")
    write_jsonl(run / "runs" / "sentiment" / "dpo-beta0.1" / "metrics.jsonl", training_records())
    write_jsonl(run / "runs" / "sentiment" / "ipo-beta0.5" / "metrics.jsonl", training_records(0.5))
    write_jsonl(run / "runs" / "arith" / "rest" / "steps.jsonl", rest_records())
    write_jsonl(
        run / "runs" / "arith" / "rest" / "grown" / "grow_000.jsonl",
        [  # samples: not a section
            {"grow_step": 0, "prompt_index": 0, "prompt": "1+2=", "response": "3", "reward": 1.0}
        ],
    )
    write_jsonl(
        run / "runs" / "arith" / "rest" / "improve" / "g000_i00" / "metrics.jsonl",
        training_records(),
    )
    save_png(run / "rest_arith_steps.png")  # named by the rest row's "plot"
    save_png(run / "genarm_alpha_sweep.png")  # the GenARM demo's own figure: used, not redrawn
    write_jsonl(
        run / "discovery" / "archive.jsonl",
        [
            {
                "generation": 0,
                "name": "dpo_like",
                "fitness": 0.42,
                "valid": True,
                "reason": None,
                "code_hash": "a",
            },
            {
                "generation": 1,
                "name": "best_one",
                "fitness": 0.61,
                "valid": True,
                "reason": None,
                "code_hash": "b",
            },
            {
                "generation": 1,
                "name": "broken",
                "fitness": None,
                "valid": False,
                "reason": "uses import",
                "code_hash": "c",
            },
            {
                "generation": 2,
                "name": "middle",
                "fitness": 0.5,
                "valid": True,
                "reason": None,
                "code_hash": "d",
            },
        ],
    )
    # data, not metrics
    write_jsonl(run / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    return run


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A demo-like run directory and its report, built once (plotting is the slow part)."""
    run = make_demo_dir(tmp_path_factory.mktemp("report") / "demo")
    md_path, html_path = write_run_report(run)
    return run, md_path, html_path


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key) and tag != "img":
                self.links.append(a[key] or "")


def parse_images(page: str) -> Images:
    parser = Images()
    parser.feed(page)
    return parser


def png_size(src: str) -> tuple[int, int]:
    """Width and height of a data-URI PNG, checked by Pillow (matplotlib's own dependency)."""
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
        return img.size


def test_demo_dir_report_has_every_section(demo_report):
    demo_dir, md_path, html_path = demo_report
    md = md_path.read_text()
    for heading in (
        "## Results",
        "## sentiment: gold reward against KL",
        "### sentiment / genarm",
        "### arith / rest",
        "## Training",
        "## ReST: per step",
        "## Discovery leaderboard",
        "## Other plots",
    ):
        assert heading in md, heading
    assert "| sentiment | dpo | 0.400 |" in md and "| arith | rest | 0.600 | - | 2.000 |" in md
    # Leaderboard: best first, the rejected proposal with its reason after the ranked ones.
    board = md[md.index("## Discovery leaderboard") :]
    assert (
        board.index("best_one")
        < board.index("middle")
        < board.index("dpo_like")
        < board.index("uses import")
    )
    assert "4 proposals, 3 valid, 1 rejected." in board
    # Resumed steps are merged: the last record of step 8 wins.
    assert "| runs/sentiment/dpo-beta0.1/metrics.jsonl | 8 | 0.050 | 0.900 |" in md
    assert "| runs/arith/rest/improve/g000_i00/metrics.jsonl | 8 |" in md  # six levels down
    # ReST steps are labelled init / G / I and their nested metrics flattened; samples are skipped.
    rest = md[md.index("## ReST: per step") : md.index("## Discovery leaderboard")]
    assert "| I1.1 | 0.600 | 0.300 | - | - | 0.500 | 0.300 | 2.000 | 0.900 |" in rest
    assert "| G0 | - | - | 0.300 |" in rest and "grow_000" not in md
    # GenARM: the trade-off table and plot from the row, the alpha sweep figure its demo saved.
    genarm = md[md.index("### sentiment / genarm") : md.index("## arith")]
    assert (
        "| weights | sentiment | brevity | kl |" in genarm
        and "| 0.500, 0.500 | 0.450 | 0.733 | 0.500 |" in genarm
    )
    assert "(genarm_alpha_sweep.png)" in genarm and "sentiment_genarm_tradeoff.png" in genarm
    assert "sentiment_genarm_alpha_sweep.png" not in md
    # Every linked image exists and is shown once; the demo's own frontier and checkpoints are
    # not repeated.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(set(links)) and all((demo_dir / link).is_file() for link in links)
    names = [Path(link).name for link in links]
    assert (
        "attention.png" in names and "ignored.png" not in names and "rest_arith_steps.png" in names
    )
    assert (
        "sentiment_reward_vs_kl.png" not in links
        and "report_plots/sentiment_reward_vs_kl.png" in links
    )
    for plot in (
        "training_curves.png",
        "training_reward_vs_kl.png",
        "rest_0.png",
        "discovery_0.png",
        "arith_reward_vs_kl.png",
    ):
        assert plot in names, plot
    assert html_path == demo_dir / "report.html"


def test_html_is_self_contained_with_valid_pngs(demo_report):
    _, md_path, html_path = demo_report
    page = html_path.read_text()
    found = parse_images(page)
    n_links = len(re.findall(r"!\[[^\]]*\]\(", md_path.read_text()))
    assert len(found.srcs) == n_links >= 9
    for src in found.srcs:
        width, height = png_size(src)
        assert width > 50 and height > 50
    assert found.links == [] and "http" not in page.replace("<!DOCTYPE html>", "")
    assert "<script" not in page and "<style>" in page


def test_chromium_loads_every_plot(demo_report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
            "(Debian's package)"
        )
    html_path = demo_report[2]
    page = html_path.read_text()
    n_images = len(parse_images(page).srcs)
    probe = (
        "<script>window.addEventListener('load', () => {"
        " const imgs = Array.from(document.images);"
        " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        " document.title = 'loaded ' + ok + ' of ' + imgs.length; });</script>"
    )
    probed = tmp_path / "probe" / "report.html"
    probed.parent.mkdir()
    probed.write_text(page.replace("</body>", probe + "</body>"))
    dom = chromium_dom(probed, tmp_path / "chromium-profile")
    title = re.search(r"<title>([^<]*)</title>", dom)
    assert title, dom[:500]
    assert title.group(1) == f"loaded {n_images} of {n_images}"

    # The probe can fail: a broken image is counted as not loaded.
    broken = tmp_path / "probe" / "broken.html"
    broken.write_text(
        page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1).replace(
            "</body>", probe + "</body>"
        )
    )
    dom = chromium_dom(broken, tmp_path / "chromium-profile")
    assert f"loaded {n_images - 1} of {n_images}" in dom


def chromium_dom(page: Path, profile: Path) -> str:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_training_run_alone(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", training_records())
    (tmp_path / "config.json").write_text("{}")
    md_path, html_path = write_run_report(tmp_path)
    md = md_path.read_text()
    assert "## Training" in md and "## Results" not in md and "Other plots" not in md
    assert "| metrics.jsonl | 8 | 0.050 | 0.900 | 0.850 | 4.200 |" in md
    assert len(parse_images(html_path.read_text()).srcs) == 2  # curves and the training frontier


def test_sweep_files_from_a_genarm_run(tmp_path):
    write_jsonl(
        tmp_path / "alpha_sweep.jsonl",
        [
            {"alpha": a, "gold_reward": a, "kl": a * 3, "brevity_reward": 1 - a}
            for a in (0.0, 0.25, 1.0)
        ],
    )
    write_jsonl(
        tmp_path / "tradeoff.jsonl",
        [
            {"alphas": [a, 1 - a], "gold_reward": a, "brevity_reward": 1 - a}
            for a in (0.0, 0.5, 1.0)
        ],
    )
    md = write_run_report(tmp_path)[0].read_text()
    for plot in (
        "sweep_0_alpha_sweep.png",
        "sweep_0_tradeoff.png",
        "sweep_1_tradeoff.png",
        "sweeps_reward_vs_kl.png",
    ):
        assert plot in md, plot
    assert "sweep_1_alphas_sweep" not in md  # a list of alphas has no single x axis


def test_empty_and_missing_dirs(tmp_path):
    md = write_run_report(tmp_path)[0].read_text()
    assert "Nothing to report" in md
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        write_run_report(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report_cli(argparse.Namespace(run_dirs=[str(tmp_path / "absent")], out=None))


def test_merge_and_cli(tmp_path, capsys):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    results = demo_results()
    del results["tasks"]["sentiment"]["methods"]["genarm"]
    (demo_dir / "results.json").write_text(json.dumps(results))
    write_jsonl(demo_dir / "runs" / "dpo" / "metrics.jsonl", training_records())
    train = tmp_path / "train"
    write_jsonl(train / "metrics.jsonl", training_records())
    out = tmp_path / "merged"
    assert report_cli(argparse.Namespace(run_dirs=[str(demo_dir), str(train)], out=str(out))) == 0
    printed = capsys.readouterr().out
    assert (
        printed.count("wrote ") == 3
        and (train / "report.html").is_file()
        and (demo_dir / "report.md").is_file()
    )
    md = (out / "report.md").read_text()
    assert (
        md.index("## Gold reward against KL, all runs")
        < md.index("## Run demo")
        < md.index("## Run train")
    )
    assert "### Training" in md and "| runs/dpo/metrics.jsonl | 8 |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(set(links)) and all((out / link).is_file() for link in links)
    for plot in (
        "merged_sentiment_reward_vs_kl.png",
        "merged_training_runs_reward_vs_kl.png",
        "run0_training_curves.png",
        "run1_training_curves.png",
    ):
        assert any(link.endswith(plot) for link in links), plot
    page = (out / "report.html").read_text()
    assert len(parse_images(page).srcs) == len(links)
    # merge_reports alone, without touching the run directories' own reports.
    (train / "report.md").unlink()
    merge_reports([train], tmp_path / "one")
    assert (tmp_path / "one" / "report.html").is_file() and not (train / "report.md").exists()


def test_frontier_has_one_curve_per_method():
    curves = {c.label: c for c in demo_curves(demo_results()["tasks"]["sentiment"]["methods"])}
    assert list(curves) == ["sft", "dpo", "genarm"]
    assert curves["dpo"].kl == [0.8, 1.5, 2.9] and curves["sft"].se == [0.02]
    assert len(curves["genarm"].gold) == 3


@pytest.mark.parametrize(
    "records, kind",
    [
        ([{"step": 1, "loss": 0.5}], "training"),
        ([{"step": 4, "eval/gold_reward": 0.5}], "training"),
        ([{"grow_step": 0, "kept": 3, "step": 10, "loss": 1.0}], "rest"),
        ([{"kind": "initial", "eval": {}}, {"kind": "grow", "grow": 0}], "rest"),
        ([{"grow_step": 0, "prompt": "1+1=", "response": "2", "reward": 1.0}], None),
        ([{"alpha": 0.5, "gold_reward": 1.0}], "sweeps"),
        ([{"name": "x", "fitness": 1.0, "valid": True}], "archives"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], None),
        ([], None),
    ],
)
def test_classify(records, kind):
    assert classify(records) == kind


def test_scan_skips_checkpoints_and_data(tmp_path):
    demo_dir = make_demo_dir(tmp_path / "demo")
    found = scan_run(demo_dir)
    assert sorted(found.training) == [
        "runs/arith/rest/improve/g000_i00/metrics.jsonl",
        "runs/sentiment/dpo-beta0.1/metrics.jsonl",
        "runs/sentiment/ipo-beta0.5/metrics.jsonl",
    ]
    assert list(found.rest) == ["runs/arith/rest/steps.jsonl"] and list(found.archives) == [
        "discovery/archive.jsonl"
    ]
    assert [p.relative_to(demo_dir).as_posix() for p in found.images] == [
        "genarm_alpha_sweep.png",
        "rest_arith_steps.png",
        "sentiment_reward_vs_kl.png",
        "extra/attention.png",
    ]
    shutil.rmtree(demo_dir / "runs")
    assert scan_run(demo_dir).training == {}


def test_rest_run_dir_uses_its_own_step_figure(tmp_path):
    write_jsonl(tmp_path / "steps.jsonl", rest_records())
    save_png(tmp_path / "steps.png")
    write_jsonl(tmp_path / "improve" / "g000_i00" / "metrics.jsonl", training_records())
    md = write_run_report(tmp_path)[0].read_text()
    rest = md[md.index("## ReST: per step") :]
    assert "![ReST per-step curves: steps.png](steps.png)" in rest and "rest_0.png" not in md
    assert "| init | - | - | - | 0.300 | 0.300 | 0.200 | 0.000 | - |" in rest
    assert "Other plots" not in md


@pytest.mark.parametrize(
    "results,field,got",
    [
        ({"tasks": {"sentiment": 5}}, "tasks.sentiment", "int"),
        ({"tasks": {"sentiment": {"methods": [1]}}}, "tasks.sentiment.methods", "list"),
        ({"tasks": {"sentiment": {"methods": {"dpo": "x"}}}}, "tasks.sentiment.methods.dpo", "str"),
    ],
)
def test_a_malformed_results_file_is_a_located_error(tmp_path, capsys, results, field, got):
    """A results.json whose task or method entries were not objects ended in an
    AttributeError traceback."""
    from prefalign.cli import main

    (tmp_path / "run.json").write_text('{"kind": "demo"}')
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"prefalign report: error: {tmp_path / 'results.json'}: field '{field}': expected an "
        f"object, got {got}"
    ), err


def test_metrics_records_without_a_numeric_step_are_not_steps(tmp_path):
    """A step that is not a number (a hand edit, another tool's file) made the report's sort
    fail with a TypeError traceback; such records are no training steps."""
    (tmp_path / "run.json").write_text('{"kind": "train"}')
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n{"step": "a", "loss": 0.4}\n{"step": null, "loss": 0.3}\n'
        '{"step": 2, "loss": 0.2}\n'
    )
    md, _ = write_run_report(tmp_path)
    assert "loss" in md.read_text()
