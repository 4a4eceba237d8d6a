"""Hydra launcher configs for sweeps: joblib on one machine, SLURM (submitit) on a cluster.

There is no SLURM here: the SLURM test runs Hydra's real submitit launcher up to the point where it would
call sbatch, and checks the sbatch script submitit writes from conf/hydra/launcher/slurm.yaml.
"""

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from convobot.config import CONF_DIR


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def launch_on_slurm(tmp_path, monkeypatch, *overrides: str):
    """Launch a 2-point sweep through the SLURM launcher; return submitit's SLURM executor and the jobs' args."""
    import submitit

    submitted = {}

    class Finished:
        def results(self):
            return ["done"]

    def capture(executor, fn, *job_args):
        submitted.update(executor=executor, job_args=list(zip(*job_args)))
        return [Finished() for _ in submitted["job_args"]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    fake_bin = tmp_path / "bin"  # submitit checks that srun exists before it builds a SLURM executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_with_hydra("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["optim.lr=1e-4"], ["optim.lr=2e-4"]], initial_job_idx=0) == ["done", "done"]
    return submitted["executor"]._executor, submitted["job_args"]


def sbatch_script(slurm_executor) -> str:
    return slurm_executor._make_submission_file_text("python -m submitit.core._submit FOLDER", "uid")


def test_slurm_launcher_submits_one_single_gpu_job_per_sweep_point(tmp_path, monkeypatch):
    slurm, jobs = launch_on_slurm(tmp_path, monkeypatch, "hydra.launcher.partition=gpu")
    script = sbatch_script(slurm)
    assert [job[0] for job in jobs] == [["optim.lr=1e-4"], ["optim.lr=2e-4"]]
    for line in ["--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--time=720", "--nodes=1", "--signal=USR2@120", "--open-mode=append"]:
        assert f"#SBATCH {line}" in script, line
    assert f"{tmp_path}/sweep/.submitit/" in script


def test_slurm_launcher_runs_one_ddp_job_per_node(tmp_path, monkeypatch):
    """gpus_per_node=4 tasks_per_node=4: srun starts 4 tasks, each a rank (convobot.training.distributed)."""
    slurm, _ = launch_on_slurm(tmp_path, monkeypatch, "hydra.launcher.gpus_per_node=4",
                               "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2")
    script = sbatch_script(slurm)
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --nodes=2" in script


def test_slurm_requeues_timed_out_jobs(tmp_path, monkeypatch):
    slurm, _ = launch_on_slurm(tmp_path, monkeypatch)
    assert slurm.max_num_timeout == 3  # with resume=auto a requeued job continues from its checkpoint


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
])
def test_launchers_compose_with_the_training_config(launcher, target):
    cfg = compose_with_hydra(f"hydra/launcher={launcher}", "experiment=smoke")
    assert cfg.hydra.launcher._target_ == target
    assert type(instantiate(cfg.hydra.launcher)).__name__ == target.rsplit(".", 1)[1]
    assert cfg.experiment_name == "smoke"  # the job config is untouched by the launcher choice
