"""Perplexity reports: sliding windows, held-out data sources, and base vs adapter vs merged."""

import io
import json
import math

import pytest
from hydra.errors import MissingConfigException
from rich.console import Console

from convobot.config import DataConfig, DataSource, EvalConfig, EvalRows, SlidingConfig
from convobot.errors import ConfigError, DataError, ModelPathError, VerificationError
from convobot.runs.loading import load_model
from convobot.runs.rundir import open_run
from convobot.scoring import perplexity
from convobot.scoring.evaluate import check_same_perplexity, evaluate


def quiet_evaluate(**options) -> dict:
    return evaluate(EvalConfig(**options), console=Console(file=io.StringIO()))


@pytest.mark.parametrize("length, window, stride", [(10, 4, 1), (37, 8, 3), (64, 16, 8), (65, 16, 15), (5, 16, 8)])
def test_sliding_windows_score_every_token_after_the_first_exactly_once(length, window, stride):
    stream = list(range(1000, 1000 + length))
    windows = perplexity.sliding_windows(stream, window, stride)
    # A window's first token has no context there, so it is never a target.
    assert all(w["scored_from"]["sliding"] >= 1 for w in windows)
    targets = [token for w in windows for token in w["input_ids"][w["scored_from"]["sliding"]:]]
    assert targets == stream[1:]
    assert all(len(w["input_ids"]) <= window for w in windows)
    assert all(w["input_ids"] == stream[s: s + len(w["input_ids"])] for s, w in zip(range(0, length, stride), windows))


def test_sliding_windows_need_a_stride_below_the_window():
    with pytest.raises(ValueError, match="0 < stride < window"):
        perplexity.sliding_windows(list(range(20)), 8, 8)


def test_sliding_window_perplexity_matches_plain_perplexity_within_one_window(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    pairs = open_run(smoke_release.run_dir).heldout_pairs().select(range(2))
    stream = perplexity.token_stream(pairs, tokenizer)
    assert len(stream) < 256  # fits the tiny model's context: one window, nothing to slide
    plain = perplexity.score_rows(model, [{"input_ids": stream, "scored_from": {"full": 1}}], tokenizer.pad_token_id)["full"]
    sliding = perplexity.sliding_window_perplexity(model, stream, 256, 128, tokenizer.pad_token_id)
    assert sliding["windows"] == 1 and sliding["tokens"] == plain["tokens"] == len(stream) - 1
    assert math.isclose(sliding["perplexity"], plain["perplexity"], rel_tol=1e-6)


def test_sliding_window_perplexity_is_independent_of_batch_size(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    stream = perplexity.token_stream(open_run(smoke_release.run_dir).heldout_pairs().select(range(6)), tokenizer)
    one, many = (perplexity.sliding_window_perplexity(model, stream, 64, 24, tokenizer.pad_token_id, batch_tokens=b)
                 for b in (1, 1024))
    assert one["windows"] == many["windows"] > 5 and one["tokens"] == many["tokens"] == len(stream) - 1
    assert math.isclose(one["perplexity"], many["perplexity"], rel_tol=1e-5)


def test_base_adapter_merged_side_by_side(smoke_release, tmp_path):
    output = tmp_path / "report.json"
    report = quiet_evaluate(run_dir=str(smoke_release.run_dir), compare=["base", "adapter", "merged"],
                            output=str(output))
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    models = report["models"]
    assert list(models) == ["base", "adapter", "merged"] and report["rows"] == 16
    for kind in ("full", "response", "sliding"):
        assert models["base"][kind]["tokens"] == models["merged"][kind]["tokens"] > 0
        assert math.isclose(models["adapter"][kind]["perplexity"], models["merged"][kind]["perplexity"], rel_tol=1e-4)
        assert not math.isclose(models["base"][kind]["perplexity"], models["merged"][kind]["perplexity"], rel_tol=1e-4)
    assert report["adapter_vs_merged"]["max_relative_difference"] <= 1e-4
    # The bundle scores as the in-memory merge does, and as merge_report.json recorded.
    bundle = quiet_evaluate(model=str(smoke_release.release))["models"][smoke_release.release.name]
    assert math.isclose(bundle["full"]["perplexity"], models["merged"]["full"]["perplexity"], rel_tol=1e-5)
    recorded = smoke_release.report["perplexity"]["merged"]["response"]["perplexity"]
    assert math.isclose(bundle["response"]["perplexity"], recorded, rel_tol=1e-5)


def test_data_spelt_as_for_training_a_file_or_a_conf_data_split(smoke_release, tmp_path, compose_command):
    rows = (smoke_release.run_dir / "heldout.jsonl").read_text().splitlines()[:5]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    bundle = f"model={smoke_release.release}"
    every_row = compose_command("eval", bundle, "data=local", f"data.path={tmp_path / 'rows.jsonl'}", "rows=all",
                                "max_length=64", "sliding.enabled=false")
    assert every_row.data.source == DataSource.local and every_row.rows == EvalRows.all
    from_file = evaluate(every_row, console=Console(file=io.StringIO()))
    assert from_file["rows"] == 5 and "sliding" not in from_file["models"]["bundle"]
    assert from_file["models"]["bundle"]["max_length"] == 64 and "(all rows)" in from_file["data"]
    split = evaluate(compose_command("eval", bundle, "data=bundled", "max_rows=12", "sliding.stride=200"),
                     console=Console(file=io.StringIO()))
    assert split["rows"] == 12 and "held-out split" in split["data"]
    assert split["models"]["bundle"]["sliding"]["stride"] == 200
    held_out_of_the_file = quiet_evaluate(model=str(smoke_release.release), sliding=SlidingConfig(enabled=False),
                                          data=DataConfig(name="local", source=DataSource.local,
                                                          path=str(tmp_path / "rows.jsonl"), eval_size=2))
    assert held_out_of_the_file["rows"] == 2


def test_adapter_and_merged_must_agree():
    close = {kind: {"perplexity": 10.0} for kind in ("full", "response")}
    assert check_same_perplexity(close, close, 1e-4)["max_relative_difference"] == 0
    apart = {"full": {"perplexity": 10.0}, "response": {"perplexity": 10.1}}
    with pytest.raises(VerificationError, match="response perplexity differ by 0.01"):
        check_same_perplexity(close, apart, 1e-4)


def test_eval_config_and_bad_input_errors(smoke_release, tmp_path, compose_command):
    assert compose_command("eval", "model=m", "compare=[base,merged]").compare == ["base", "merged"]
    with pytest.raises(ModelPathError, match="does not exist"):
        quiet_evaluate(model=str(tmp_path / "missing"))
    with pytest.raises(ModelPathError, match="nothing to evaluate"):
        quiet_evaluate()
    with pytest.raises(MissingConfigException, match="data/nope"):
        compose_command("eval", "model=m", "data=nope")
    with pytest.raises(ConfigError, match="'data.path' is required"):
        compose_command("eval", "model=m", "data=local")
    with pytest.raises(DataError, match="data file not found"):
        quiet_evaluate(model=str(smoke_release.release), data=DataConfig(name="local", source=DataSource.local,
                                                                       path=str(tmp_path / "none.jsonl")))
    with pytest.raises(ConfigError, match="unknown model"):
        quiet_evaluate(run_dir=str(smoke_release.run_dir), compare=["base", "tuned"])
    with pytest.raises(ConfigError, match="sliding.stride"):
        quiet_evaluate(model=str(smoke_release.release), max_rows=2, sliding=SlidingConfig(window=32, stride=32))


def test_a_tampered_bundle_is_not_scored(tampered_bundle):
    with pytest.raises(VerificationError, match="model.safetensors: checksum differs"):
        quiet_evaluate(model=str(tampered_bundle), sliding=SlidingConfig(enabled=False))
