"""The wheel is a working install: built from the sources, installed without the repo (no editable install, no
conf/ beside it), its front door trains and its console scripts plan from an empty folder."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the build writes build/ where it runs)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "convobot", source / "convobot", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("convobot-*.whl")
    return built


def test_the_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"convobot/conf/{p.relative_to(REPO / 'convobot' / 'conf').as_posix()}"
               for p in (REPO / "convobot" / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    assert "convobot/conf/commands/data/local.yaml" in names  # eval's data group, as train spells it


@pytest.mark.slow
def test_installed_wheel_trains_and_plans_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The project's dependencies, seen through a path file: plain paths only, so the editable install's finder
    # in that folder is not loaded and `import convobot` can only find the wheel.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def run(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), cwd=empty, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = run(str(python), "-c", "import convobot.config as c; print(c.__file__, c.CONF_DIR)").stdout.split()
    assert all(Path(path).is_relative_to(venv) for path in where), where
    run(str(venv / "bin" / "convobot"), "train", "experiment=smoke", "train.max_steps=2", "report.before=false",
        "report.samples=0", "report.exact_match_rows=0", "hydra.run.dir=run")
    assert (empty / "run" / "adapter" / "adapter_model.safetensors").is_file()
    planned = run(str(venv / "bin" / "convobot-plan"), "experiment=seed_repro", "hardware=rtx3050_4gb")
    assert "FITS" in planned.stdout
