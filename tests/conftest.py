from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: CI and developers have it, a plain clone may not."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (real alpaca-gpt4 rows and GPT-2 tokenizer live there)")
    return path


@pytest.fixture
def compose_train():
    """Compose conf/train.yaml with overrides and return the validated, typed config."""
    from convobot.config import compose, validate

    def _compose(*overrides: str):
        return validate(compose(list(overrides)))

    return _compose


# Training a few steps of the smoke experiment; shared by the merge, eval, export and chat tests.
SMOKE = ["experiment=smoke", "report.before=false", "report.exact_match_rows=0", "report.samples=0",
         "train.max_steps=2", "data.num_rows=160", "data.eval_size=16"]


@pytest.fixture(scope="session")
def train_smoke():
    """Train a few smoke steps into a run dir (with the config.yaml convobot-train writes) and return it."""
    from convobot.config import compose, validate
    from convobot.train import run

    def _train(run_dir: Path, *overrides: str) -> Path:
        run(validate(compose(SMOKE + list(overrides))), run_dir)
        return run_dir

    return _train


@pytest.fixture(scope="session")
def quiet_merge():
    """convobot.merge.merge with its options as keywords, printing nothing."""
    import io

    from rich.console import Console

    from convobot.config import MergeConfig
    from convobot.merge import merge

    return lambda **options: merge(MergeConfig(**options), console=Console(file=io.StringIO()))


@pytest.fixture(scope="session")
def smoke_release(tmp_path_factory, train_smoke, quiet_merge) -> SimpleNamespace:
    """A LoRA smoke run and its verified bundle, made once per test session (2-10 s, as busy as the CPU is)
    and shared by the merge, eval, export and chat tests: they only read it (copy it to change it)."""
    root = tmp_path_factory.mktemp("smoke_release")
    run_dir = train_smoke(root / "smoke_lora")
    release = root / "release" / "bundle"
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(release))
    return SimpleNamespace(run_dir=run_dir, release=release, report=report)


@pytest.fixture(scope="session")
def compose_command():
    """A command config from conf/commands/, composed and validated as its CLI does."""
    from convobot.config import compose_command

    return lambda name, *overrides: compose_command(name, list(overrides))


@pytest.fixture
def tampered_bundle(smoke_release, tmp_path) -> Path:
    """A copy of the smoke bundle with one byte of its model.safetensors flipped (past the header: it still loads)."""
    import shutil

    copy = shutil.copytree(smoke_release.release, tmp_path / "tampered")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    return copy
