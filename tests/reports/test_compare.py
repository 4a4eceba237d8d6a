"""convobot-compare on real run dirs of the tiny model: report.md, summary.csv, real plots and the runs' answers
side by side."""

import csv
import html
import json

import pytest
from matplotlib.image import imread

from convobot.errors import CompareError, RunDirError
from convobot.reports import compare
from convobot.training.recipe import run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A LoRA and a full fine-tune smoke run (same data, same budget), each answering 4 held-out prompts."""
    from convobot.config import compose, validate

    root = tmp_path_factory.mktemp("runs")
    for method in ("lora", "full"):
        cfg = validate(compose(["experiment=smoke", f"peft={method}", "report.before=false", "report.samples=0",
                                "report.generate_metrics=true", "report.generate_rows=4", "report.max_new_tokens=8"]))
        run(cfg, root / method)
    return root / "lora", root / "full"


def test_compare_two_run_dirs_writes_report_table_and_plots(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare.main([*map(str, two_runs), "--out", str(out), "--title", "LoRA vs full"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "full"] and set(rows[0]) == set(compare.COLUMNS)
    for row, run_dir in zip(rows, two_runs):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert int(row["trainable_params"]) == metrics["trainable_params"]
        assert float(row["eval_perplexity"]) == pytest.approx(metrics["eval_perplexity"])
        assert float(row["peak_memory_mib"]) == pytest.approx(metrics["peak_memory_bytes"] / 2**20)
        assert float(row["tokens_per_second"]) == pytest.approx(metrics["tokens_per_second"])
        assert float(row["train_loss_final"]) == pytest.approx(losses[-1])
        assert float(row["exact_match"]) == pytest.approx(metrics["exact_match"])
    assert int(rows[0]["trainable_params"]) < int(rows[1]["trainable_params"])

    report = (out / "report.md").read_text()
    assert report.startswith("# LoRA vs full") and "| eval perplexity |" in report
    for name in compare.PLOTS:
        png = out / "plots" / f"{name}.png"
        assert f"](plots/{name}.png)" in report
        height, width, _ = imread(png).shape  # a real, decodable image of a useful size
        assert height >= 300 and width >= 600
    assert not list(out.parent.glob(".*.tmp"))  # written atomically


def test_the_report_shows_each_runs_answers_to_the_same_prompts(two_runs, tmp_path):
    out = tmp_path / "report"
    compare.compare(two_runs, out, title="LoRA vs full")
    predictions = [[json.loads(line) for line in (run_dir / "predictions.jsonl").open()] for run_dir in two_runs]
    assert [len(p) for p in predictions] == [4, 4]
    assert [r["prompt"] for r in predictions[0]] == [r["prompt"] for r in predictions[1]]  # one held-out split
    rows = list(csv.DictReader((out / "summary.csv").open()))
    for row, run_dir in zip(rows, two_runs):
        answers = json.loads((run_dir / "metrics.json").read_text())["answers"]
        assert answers["rows"] == 4 and float(row["rougeL"]) == pytest.approx(answers["rougeL"])
        assert float(row["bleu"]) == pytest.approx(answers["bleu"])
    report = (out / "report.md").read_text()
    assert "| BLEU | chrF | ROUGE-L |" in report and "## Answers side by side" in report
    assert "](plots/answers_vs_params.png)" in report and imread(out / "plots" / "answers_vs_params.png").shape[0] >= 300
    page = (out / "answers.html").read_text()
    for records in predictions:
        for record in records:
            assert html.escape(record["answer"]) in page and html.escape(record["reference"]) in page
    assert page.count("<tr>") == 4 + 1  # the header and one row per prompt


def test_plots_have_titles_axes_units_and_the_data(two_runs):
    runs = compare.load_runs(two_runs)
    assert [r.label for r in runs] == ["lora", "full"]  # no overrides recorded: the dir names
    ax = compare.plot_loss_curves(runs).axes[0]
    assert "LoRA" in ax.get_title() and "step" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    train_lines = [line for line in ax.get_lines() if line.get_label().endswith("(train)")]
    assert [line.get_linestyle() for line in train_lines] == ["-", "--"]  # LoRA solid, full dashed
    for line, r in zip(train_lines, runs):
        assert list(line.get_ydata()) == [p["loss"] for p in r.curve if "loss" in p]
    assert ax.get_legend() is not None

    ax = compare.plot_perplexity_vs_params(runs).axes[0]
    assert ax.get_xscale() == "log" and "trainable parameters" in ax.get_xlabel()
    assert "perplexity" in ax.get_ylabel()
    ax = compare.plot_peak_memory(runs).axes[0]
    assert "MiB" in ax.get_xlabel() and "RSS" in ax.get_xlabel()  # CPU runs: says what was measured
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == pytest.approx([r.metrics["peak_memory_bytes"] / 2**20 for r in runs])
    ax = compare.plot_throughput(runs).axes[0]
    assert "tokens per second" in ax.get_xlabel()


def test_labels_are_the_overrides_that_differ(tmp_path, two_runs):
    import shutil

    for number, method in enumerate(("lora", "full")):
        job = tmp_path / f"{number}_peft={method}"
        shutil.copytree(two_runs[number], job)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=smoke\n- peft={method}\n- hydra.verbose=false\n")
    runs = compare.load_runs([tmp_path])
    assert [r.label for r in runs] == ["peft=lora", "peft=full"]
    assert runs[0].overrides == ["experiment=smoke", "peft=lora"]  # hydra.* left out


def test_bad_paths_are_named(tmp_path, two_runs):
    with pytest.raises(SystemExit, match="convobot-compare: CompareError: .*missing: no such directory"):
        compare.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CompareError, match="empty: no metrics.json"):
        compare.load_runs([empty])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(RunDirError, match="broken/metrics.json: not valid JSON"):
        compare.load_runs([broken])
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(FileExistsError):
        compare.compare(list(two_runs), out)
    assert compare.compare(list(two_runs), out, overwrite=True).is_file()
