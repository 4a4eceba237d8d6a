"""Data-parallel training on CPU: real 2-process runs over gloo, launched by torchrun and accelerate."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convobot.training.distributed import export_submitit_env, weights_fingerprint

BIN = Path(sys.executable).parent
TINY_RUN = ["experiment=smoke", "report.before=false", "report.exact_match_rows=0", "report.samples=0",
            "train.log_samples=true"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# torchrun's run is docs/scaling.md's (checked by tests/docs_checks.py); accelerate's is here.
LAUNCHERS = {
    "accelerate": lambda: [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"],
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_run_shards_data_and_rank0_saves_what_all_ranks_trained(tmp_path, launcher):
    # Each rank gets its own Hydra dir here, as a `${now:...}` dir can when ranks start a second apart:
    # they must still end up in rank 0's.
    command = [*LAUNCHERS[launcher](), "-m", "convobot.training.recipe", *TINY_RUN, f"hydra.run.dir={tmp_path}/rank${{oc.env:RANK}}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "rank0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0"]  # rank 1 dropped its own dir

    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["world_size"] == 2 and results["effective_batch_size"] == 2 * 8 and results["steps"] == 6
    assert done.stdout.count("convobot · smoke") == 1  # one summary, from rank 0
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == [2, 4, 6]  # rank 0 alone writes metrics.jsonl
    assert {p.name for p in (run_dir / "checkpoints" / "checkpoint-6").glob("rng_state_*")} == {
        "rng_state_0.pth", "rng_state_1.pth"}  # both ranks wrote into the shared checkpoints

    ranks = [read_jsonl(run_dir / "samples" / f"rank{k}.jsonl") for k in (0, 1)]
    seen = [[h for row in rows if "samples" in row for h in row["samples"]] for rows in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 * 8
    assert not set(seen[0]) & set(seen[1])  # different data on each rank
    # The Trainer's token count (gathered over ranks) is what the two ranks trained on together.
    assert sum(sum(row["tokens"]) for rows in ranks for row in rows if "tokens" in row) == results["train_tokens"]
    assert results["tokens_per_second"] > 0

    # The adapter rank 0 saved holds the weights each rank ended training with.
    saved = weights_fingerprint(load_file(run_dir / "adapter" / "adapter_model.safetensors").values())
    assert ranks[0][-1]["trainable_sha256"] == ranks[1][-1]["trainable_sha256"] == saved


def test_weights_fingerprint_ignores_names_and_order_but_not_values():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    assert weights_fingerprint([a, b]) == weights_fingerprint([b.clone(), a.clone()])
    changed = a.clone()
    changed[1, 2] += 1e-6
    assert weights_fingerprint([changed, b]) != weights_fingerprint([a, b])


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
              "SLURM_LOCALID": "1"}
TORCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]


@pytest.fixture
def slurm_env(monkeypatch):
    for key in TORCH_VARS:
        # setenv first so monkeypatch records the key and removes what export_submitit_env writes; a bare
        # delenv of an absent key records nothing, and a leaked RANK/WORLD_SIZE hangs later runs in rendezvous.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    return monkeypatch


def test_a_multi_task_slurm_job_becomes_one_ddp_run(slurm_env):
    """Task 5 of 8 (2 nodes x 4 GPUs): the torchrun variables the Trainer reads, from submitit."""
    export_submitit_env()
    env = {key: os.environ[key] for key in TORCH_VARS}
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "gpu07" and int(env["MASTER_PORT"]) > 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # each rank picks cuda:LOCAL_RANK among all GPUs


def test_a_single_task_job_or_torchrun_is_left_alone(slurm_env):
    slurm_env.setenv("SLURM_NTASKS", "1")
    export_submitit_env()
    assert "RANK" not in os.environ
    slurm_env.setenv("SLURM_NTASKS", "8")
    slurm_env.setenv("RANK", "3")  # torchrun inside the job already set the ranks
    export_submitit_env()
    assert os.environ["RANK"] == "3" and "MASTER_ADDR" not in os.environ
