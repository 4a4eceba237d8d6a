from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture
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
