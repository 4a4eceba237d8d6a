from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# absl (rouge-score logs through it) binds a handler to the sys.stderr it finds when first imported. Imported under
# a test's output capture, that stream closes with the test and a later test's in-process command fails
# on it; imported here, against the real stderr, it cannot.
_captured, sys.stderr = sys.stderr, sys.__stderr__
try:
    import absl.logging  # noqa: F401
except ImportError:
    pass
finally:
    sys.stderr = _captured

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    """The slow tier first: with two workers taking tests in order, the long ones start early instead of leaving one
    worker busy at the end while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
    from convobot.training.recipe import run

    def _train(run_dir: Path, *overrides: str) -> Path:
        run(validate(compose(SMOKE + list(overrides))), run_dir)
        return run_dir

    return _train


@pytest.fixture(scope="session")
def quiet_merge():
    """convobot.release.merge.merge with its options as keywords, printing nothing."""
    import io

    from rich.console import Console

    from convobot.config import MergeConfig
    from convobot.release.merge import merge

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
def smoke_gguf(smoke_release, tmp_path_factory) -> SimpleNamespace:
    """A copy of the smoke bundle with its f32, f16 and q8_0 GGUFs, exported and checked by llama.cpp (~15 s); tests
    that use it are in the xdist group "gguf", so one worker makes it."""
    import io
    import shutil

    from rich.console import Console

    from convobot.config import GGUFConfig
    from convobot.release.gguf import export_gguf

    bundle = shutil.copytree(smoke_release.release, tmp_path_factory.mktemp("gguf") / "bundle")
    result = export_gguf(GGUFConfig(model=str(bundle), types=["f32", "f16", "q8_0"]),
                         console=Console(file=io.StringIO()))
    return SimpleNamespace(bundle=bundle, result=result)


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


@pytest.fixture
def convobot_command(capsys):
    """`convobot <args>` in this process (no interpreter start-up: seconds less per call): returns the exit status,
    stdout and stderr as a console script would give them. The logging Hydra sets up for a job is undone."""
    from convobot.__main__ import main

    def run(*args: str) -> tuple[int, str, str]:
        root = logging.getLogger()
        handlers, level, message = root.handlers[:], root.level, ""
        try:
            status = main(list(args))
        except SystemExit as exit:  # a command's one-line error is the exit's message, as Python prints it
            status, message = (exit.code, "") if isinstance(exit.code, int) or exit.code is None else (1, exit.code)
        finally:
            for handler in root.handlers[len(handlers):]:
                handler.close()
            root.handlers[:], _ = handlers, root.setLevel(level)
        captured = capsys.readouterr()
        return status or 0, captured.out, captured.err + (f"{message}\n" if message else "")

    return run
