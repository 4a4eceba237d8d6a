"""Resume after interruption (a real SIGKILL), checkpoint choice, run-dir rewinding and checkpoint retention."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_callback import TrainerState

from convobot.config import compose, validate
from convobot.errors import ConfigError
from convobot.training.distributed import weights_fingerprint
from convobot.training.recipe import run
from convobot.training.resume import find_checkpoint, is_complete, rewind_run_dir, steps_and_tokens

QUIET = ["report.before=false", "report.exact_match_rows=0", "report.samples=0"]


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended ones (the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.pt").write_bytes(b"")
    if complete:
        TrainerState(global_step=step, num_input_tokens_seen=100 * step).save_to_json(str(path / "trainer_state.json"))
    return path


@pytest.fixture
def run_dir(tmp_path):
    """A run interrupted while saving checkpoint-15: 5 and 10 are complete."""
    for step in (5, 10):
        make_checkpoint(tmp_path / "checkpoints", step)
    make_checkpoint(tmp_path / "checkpoints", 15, complete=False)
    return tmp_path


def test_resume_true_takes_the_newest_complete_checkpoint(run_dir):
    found = find_checkpoint(True, run_dir)
    assert found == run_dir / "checkpoints" / "checkpoint-10"
    assert steps_and_tokens(found) == (10, 1000) and steps_and_tokens(None) == (0, 0)
    assert find_checkpoint("auto", run_dir) == found
    assert find_checkpoint(False, run_dir) is None


def test_resume_accepts_a_run_dir_or_a_checkpoint_path(run_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("new_run")
    assert find_checkpoint(str(run_dir), elsewhere) == run_dir / "checkpoints" / "checkpoint-10"
    assert find_checkpoint(str(run_dir / "checkpoints"), elsewhere) == run_dir / "checkpoints" / "checkpoint-10"
    assert find_checkpoint(str(run_dir / "checkpoints" / "checkpoint-5"), elsewhere).name == "checkpoint-5"


def test_nothing_to_resume_is_a_clear_error_except_for_auto(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=true but .*checkpoints holds no complete checkpoint.*hydra\.run\.dir"):
        find_checkpoint(True, tmp_path)
    assert find_checkpoint("auto", tmp_path) is None
    with pytest.raises(ConfigError, match=r"'resume'.*nowhere.*neither a checkpoint-N folder"):
        find_checkpoint(str(tmp_path / "nowhere"), tmp_path)
    make_checkpoint(tmp_path / "checkpoints", 3, complete=False)
    with pytest.raises(ConfigError, match="resume=true"):
        find_checkpoint(True, tmp_path)


def test_rewind_drops_what_the_resumed_run_will_redo(run_dir):
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 13)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 13, "lo')  # killed mid-line
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "rank1.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (9, 10, 11)))
    (run_dir / ".adapter.x1y2.tmp").mkdir()  # an atomic write cut off by the kill
    (run_dir / ".metrics.json.x1y2.tmp").write_text("{")

    rewind_run_dir(run_dir, 10)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 11))
    assert [json.loads(line)["step"] for line in (run_dir / "samples" / "rank1.jsonl").read_text().splitlines()] == [
        9, 10]
    assert not list(run_dir.glob(".*.tmp"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]


@pytest.mark.parametrize("overrides,key", [
    (["resume=3"], "'resume'"),
    (["train.keep_best=true"], "'train.eval_steps'"),
    (["train.keep_best=true", "train.eval_steps=4", "train.save_steps=6"], "'train.save_steps'"),
    (["train.keep_last=0"], "'train.keep_last'"),
])
def test_bad_resume_and_retention_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose(overrides))


def test_keep_last_and_keep_best(tmp_path, one_thread):
    """keep_last=2 keeps the two newest; keep_best also keeps the lowest eval loss and saves it as the adapter.
    8-bit AdamW at lr=0.2 with GPT-2's dropout makes the tiny model's eval loss jump after step 2 (seeded), so the
    best is not the last."""
    cfg = validate(compose(["experiment=smoke", "model=tiny_random", "train.max_steps=8", "train.eval_steps=2",
                            "train.save_steps=2",
                            "train.keep_last=2", "train.keep_best=true", "optim=adamw_8bit", "optim.lr=0.2",
                            "model.dropout=null", "data.eval_size=16", *QUIET]))
    results = run(cfg, tmp_path)
    evals = {row["step"]: row["eval_loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").open())
             if "eval_loss" in row}
    best = min(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6, 8] and best != 8, evals
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-8"})
    assert results["best_checkpoint"] == str(tmp_path / "checkpoints" / f"checkpoint-{best}")
    saved = weights_fingerprint(load_file(tmp_path / "adapter" / "adapter_model.safetensors").values())
    best_weights = load_file(tmp_path / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert saved == weights_fingerprint(best_weights.values())


# 80 training rows at batch 8: 10 steps an epoch, so 24 steps cross two epoch boundaries.
def test_resuming_a_finished_run_is_refused_not_trained_one_step_further(tmp_path, one_thread):
    """The Trainer would train one step past the end; convobot stops with a clear message instead."""
    overrides = ["experiment=smoke", "train.max_steps=2", "train.save_steps=2", *QUIET]
    run(validate(compose(overrides)), tmp_path)
    log = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"checkpoint-2 already finished training \(step 2 of 2\)"):
        run(validate(compose([*overrides, "resume=true"])), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == log
    assert not (tmp_path / "checkpoints" / "checkpoint-3").exists()


TRAIN = [str(Path(sys.executable).parent / "convobot-train"), "experiment=smoke", "data.num_rows=120",
         "train.max_steps=24", "train.save_steps=4", "train.logging_steps=1", "train.log_samples=true", *QUIET]
# One thread: steady step times on a busy machine, and the same float results in every run.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return [*TRAIN, f"hydra.run.dir={run_dir}", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path):
    """24 steps with a checkpoint every 4: SIGKILL once checkpoint-8 is saved, resume, and compare step by step
    with a run that was never interrupted."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    uninterrupted = subprocess.Popen(train_command(reference), stdout=subprocess.DEVNULL, env=ENV)  # side by side
    process = subprocess.Popen(train_command(interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=ENV)
    deadline = time.monotonic() + 240
    while not is_complete(interrupted / "checkpoints" / "checkpoint-8"):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    # Killed mid-training: nothing of the end of the run exists, not even half-written.
    assert not (interrupted / "adapter").exists() and not (interrupted / "metrics.json").exists()

    subprocess.run(train_command(interrupted, "resume=true"), check=True, capture_output=True, timeout=300, env=ENV)
    assert uninterrupted.wait(timeout=300) == 0
    results = json.loads((interrupted / "metrics.json").read_text())
    assert results["steps"] == 24 and results["resumed_from_step"] >= 8
    assert not list(interrupted.glob(".*.tmp"))

    # The same samples in the same order: each step trained once, none skipped, data position restored.
    def trained(run_dir):
        return [(row["step"], row["samples"]) for row in read_jsonl(run_dir / "samples" / "rank0.jsonl")
                if "samples" in row]

    assert [step for step, _ in trained(interrupted)] == list(range(1, 25))
    assert trained(interrupted) == trained(reference)

    # The same losses (optimizer, scheduler and dropout RNG restored), up to float noise on CPU.
    def losses(run_dir):
        return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}

    resumed_losses, reference_losses = losses(interrupted), losses(reference)
    assert sorted(resumed_losses) == list(range(1, 25))
    for step, loss in reference_losses.items():
        assert math.isclose(resumed_losses[step], loss, rel_tol=1e-4), (step, resumed_losses[step], loss)
    expected = json.loads((reference / "metrics.json").read_text())
    assert math.isclose(results["eval_loss"], expected["eval_loss"], rel_tol=1e-4)
    assert results["train_tokens"] == expected["train_tokens"]


def test_resume_refuses_a_changed_model_or_adapter_before_writing_anything(tmp_path, one_thread):
    overrides = ["experiment=smoke", "train.max_steps=2", "train.save_steps=2", *QUIET]
    run(validate(compose(overrides)), tmp_path)
    saved = (tmp_path / "config.yaml").read_text()
    (tmp_path / "adapter").rename(tmp_path / "adapter.kept")
    with pytest.raises(ConfigError, match=r"other model/peft/data settings \(peft.r: 8 -> 16\)"):
        run(validate(compose([*overrides, "resume=true", "peft.r=16"])), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == saved  # nothing rewritten


def test_resume_may_change_how_long_to_train_and_records_it(tmp_path, one_thread):
    overrides = ["experiment=smoke", "train.save_steps=2", *QUIET]
    run(validate(compose([*overrides, "train.max_steps=2"])), tmp_path)
    results = run(validate(compose([*overrides, "train.max_steps=4", "resume=true"])), tmp_path)
    assert results["steps"] == 4 and results["resumed_from_step"] == 2
    assert results["resume_changes"] == {"train.max_steps": [2, 4]}


KILL_BEFORE_SAVING = """
import os, signal, sys
from pathlib import Path
from convobot.runs import rundir
from convobot.config import compose, validate
from convobot.training.recipe import run

save_model = rundir.save_model
def killed_before_the_weights(folder, *args, **kwargs):
    if Path(folder).name in ("adapter", "model"):
        os.kill(os.getpid(), signal.SIGKILL)
    save_model(folder, *args, **kwargs)
rundir.save_model = killed_before_the_weights
run(validate(compose(sys.argv[2:])), Path(sys.argv[1]))
"""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_killed_after_its_last_checkpoint_finishes_on_resume(tmp_path, method):
    """SIGKILL between the final checkpoint and the weights: resume=true saves and scores, trains no extra step."""
    overrides = ["experiment=smoke", f"peft={method}", "train.max_steps=4", "train.save_steps=2", *QUIET]
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_SAVING, str(tmp_path), *overrides], env=ENV,
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert is_complete(tmp_path / "checkpoints" / "checkpoint-4") and not (tmp_path / "metrics.json").exists()
    results = run(validate(compose([*overrides, "resume=true"])), tmp_path)
    assert results["steps"] == 4 and results["resumed_from_step"] == 4 and math.isfinite(results["eval_loss"])
    assert (tmp_path / ("adapter" if method == "lora" else "model")).is_dir()
    assert not (tmp_path / "checkpoints" / "checkpoint-5").exists()
    trained = load_file(tmp_path / "checkpoints" / "checkpoint-4" / ("adapter_model.safetensors" if method == "lora"
                                                                     else "model.safetensors"))
    saved = load_file(tmp_path / ("adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
