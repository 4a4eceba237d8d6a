"""End-to-end runs of the training recipe on the tiny model (CPU)."""

import json

import pytest

from convobot.training.recipe import run

METRIC_KEYS = {
    "train_loss", "eval_loss", "eval_perplexity", "trainable_params", "total_params", "train_tokens",
    "tokens_per_second", "peak_memory_bytes", "optimizer", "wall_seconds", "versions",
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    from convobot.config import compose, validate

    runs = {}
    for method, optim in (("lora", "auto"), ("full", "adamw_8bit")):
        run_dir = tmp_path_factory.mktemp(f"smoke_{method}")
        cfg = validate(compose(["experiment=smoke", f"peft={method}", f"optim={optim}"]))
        runs[method] = (run_dir, run(cfg, run_dir))
    return runs


@pytest.mark.parametrize("method", ["lora", "full"])
def test_smoke_run_writes_a_complete_run_dir(smoke_runs, method):
    run_dir, results = smoke_runs[method]
    artefact = run_dir / ("adapter" if method == "lora" else "model")
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (artefact / weights).is_file() and (artefact / "tokenizer.json").is_file()
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes left nothing behind
    assert (run_dir / "heldout.jsonl").read_text().count("\n") == 40
    assert (run_dir / "config.yaml").is_file()  # a complete run dir without the CLI too
    assert list((run_dir / "checkpoints").glob("checkpoint-*"))
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= on_disk.keys() and on_disk["method"] == method
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= on_disk["versions"].keys()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [2, 4, 6]


def test_smoke_metrics_are_consistent(smoke_runs):
    _, lora = smoke_runs["lora"]
    _, full = smoke_runs["full"]
    assert lora["trainable_params"] == 32_768 < full["trainable_params"] == full["total_params"]
    assert lora["steps"] == full["steps"] == 6
    assert 0 < lora["train_tokens"] == full["train_tokens"]  # same data, same seed, same token count
    assert lora["tokens_per_second"] > 0 and lora["peak_memory_bytes"] > 0
    assert abs(lora["eval_perplexity"] - 2.718281828 ** lora["eval_loss"]) < 1e-6 * lora["eval_perplexity"]


def test_8bit_optimizer_really_steps(smoke_runs):
    """optim=adamw_8bit on this CPU: bitsandbytes' 8-bit AdamW is the optimizer that trained (uint8 states)."""
    _, results = smoke_runs["full"]
    if results["optimizer_fallback_reason"]:
        pytest.skip(f"fell back: {results['optimizer_fallback_reason']}")
    assert results["optimizer"].startswith("bitsandbytes.optim") and "uint8" in results["optimizer"]


def test_default_optimizer_on_cpu_is_fused_torch_adamw(smoke_runs):
    _, results = smoke_runs["lora"]
    assert results["optimizer_requested"] == "auto" and results["optimizer_fallback_reason"] is None
    assert results["optimizer"] == "torch.optim.adamw.AdamW (state float32)"


@pytest.mark.slow
def test_tiny_model_learns_the_bundled_tasks(tmp_path):
    """Loss falls and exact-match rises on held-out task rows (LoRA, ~30 s on 2 cores)."""
    from convobot.config import compose, validate

    cfg = validate(compose(["data.num_rows=1500", "train.epochs=2", "report.exact_match_rows=100",
                            "report.samples=0"]))
    results = run(cfg, tmp_path)
    before = results["before"]
    assert results["eval_loss"] < before["eval_loss"] - 1.0
    assert results["exact_match"] >= before["exact_match"] + 0.1


@pytest.mark.parametrize("overrides, expected", [
    (["peft.r=eight"], "convobot-train: ConfigError: config key 'peft.r'"),
    (["data=local", "data.path=no_such_rows.jsonl"], "convobot-train: DataError: "),
])
def test_command_line_mistakes_end_in_one_line_naming_them(convobot_command, tmp_path, overrides, expected):
    status, _, err = convobot_command("train", "experiment=smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert status == 1
    assert expected in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]


def test_rows_longer_than_the_model_are_cut_at_its_context(tmp_path, caplog):
    """data.max_length over the model's positions is clamped at start-up, with a warning naming both."""
    from omegaconf import OmegaConf

    from convobot.config import compose, validate

    cfg = validate(compose(["experiment=smoke", "model=tiny_random", "model.n_positions=64", "data.max_length=512",
                            "train.max_steps=1", "report.before=false", "report.samples=0",
                            "report.exact_match_rows=0"]))
    with caplog.at_level("WARNING"):
        results = run(cfg, tmp_path)
    assert "data.max_length=512 exceeds the model's context of 64 positions" in caplog.text
    assert OmegaConf.load(tmp_path / "config.yaml").data.max_length == 64  # what trained, recorded
    assert results["data"]["truncated_train_rows"] > 0 and results["eval_tokens"] > 0



@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing_resume_trips_on(tmp_path):
    """A real write failure (a file-size limit, as a full disk stops a write) while the Trainer saves a full
    fine-tune's checkpoint: one line naming the checkpoints folder; the cut-off checkpoint is skipped by resume."""
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from convobot.training.resume import newest_checkpoint

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))  # the 2 MB model fits, 4 MB of Adam not

    train = Path(sys.executable).parent / "convobot-train"
    done = subprocess.run([str(train), "experiment=smoke", "peft=full", "optim=adamw_torch", "train.max_steps=3",
                           "report.before=false", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_file_size)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("convobot-train: ")]
    assert len(errors) == 1 and errors[0].startswith(f"convobot-train: SaveError: could not write a checkpoint in "
                                                     f"{tmp_path / 'checkpoints'}"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert newest_checkpoint(tmp_path / "checkpoints") is None  # what was cut off is not a checkpoint to resume
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
