"""A run dir belongs to one run: a lock held for the run's life, no silent overwrite, default dirs that never
collide, one-line refusals of dirs that cannot be used; and the readers of a run dir name the file that is wrong."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convobot.config import compose, validate
from convobot.errors import RunDirError
from convobot.runs import rundir
from convobot.training.recipe import run

TRAIN = str(Path(sys.executable).parent / "convobot-train")
QUICK = ["experiment=smoke", "report.before=false", "report.exact_match_rows=0", "report.samples=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_a_second_process_is_refused_while_the_first_holds_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    long_run = [*QUICK, "train.max_steps=60", "train.save_steps=1000", "train.logging_steps=10"]
    first = subprocess.Popen([TRAIN, *long_run, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / rundir.LOCK).is_file() or not (run_dir / rundir.LOCK).read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.02)
        with pytest.raises(RunDirError, match=f"is in use by another run \\(process {first.pid}\\)"):
            run(validate(compose([*QUICK, "train.max_steps=2"])), run_dir)  # this process: the second run
        assert first.poll() is None  # refused while the first was still training, not after it finished
    finally:
        assert first.wait(timeout=300) == 0
    assert steps_logged(run_dir) == list(range(10, 61, 10))  # one run's steps, each once
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 60


def test_runs_started_in_the_same_second_get_their_own_default_dirs(tmp_path):
    command = [TRAIN, *QUICK, "train.max_steps=1"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    finished = sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))
    assert len(finished) == 2 and finished[0] != finished[1]


def test_a_finished_run_dir_is_refused_unless_overwrite(tmp_path):
    cfg = validate(compose([*QUICK, "train.max_steps=2", "train.logging_steps=1"]))
    run(cfg, tmp_path)
    with pytest.raises(RunDirError, match=r"already holds a run \(.*metrics.json.*resume=true.*overwrite=true"):
        run(cfg, tmp_path)
    (tmp_path / "stale.txt").write_text("left by the earlier run")
    run(validate(compose([*QUICK, "train.max_steps=2", "train.logging_steps=1", "overwrite=true"])), tmp_path)
    assert steps_logged(tmp_path) == [1, 2]  # a fresh start: no second copy of the old run's steps
    assert not (tmp_path / "stale.txt").exists()


def test_what_hydra_writes_first_is_not_an_earlier_run(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    (tmp_path / "train.log").write_text("")
    assert rundir.earlier_run(tmp_path) == []
    rundir.start_fresh(tmp_path, overwrite=False)
    assert (tmp_path / ".hydra").is_dir()


def test_a_dir_that_cannot_be_used_is_refused_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunDirError, match="cannot use .*a_file/run as a run dir"):
        rundir.usable_dir(tmp_path / "a_file" / "run")


def test_a_bad_config_yaml_is_named(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "config.yaml").write_text("peft: {r: [unclosed\n")
    with pytest.raises(RunDirError, match="config.yaml: not a readable config"):
        rundir.open_run(tmp_path)
    (tmp_path / "config.yaml").write_text("peft: {r: eight}\n")
    with pytest.raises(RunDirError, match=r"config.yaml: config key 'peft.r'"):
        rundir.open_run(tmp_path)
