"""lm-evaluation-harness on a release bundle: the harness's own `hf` model class loads the bundle as transformers
does (its checksums verified first by convobot eval), and runs any harness task by name: hub tasks (hellaswag,
arc_easy, ...) where the Hub is reachable, and `convobot_tasks` offline, the bundled tasks' held-out rows answered
greedily and checked by exact match (its YAML is harness_task.yaml; the rows are written from the package when it
runs).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from convobot.config import DataConfig, HarnessConfig
from convobot.data.load import load_rows, split_rows
from convobot.errors import MissingExtraError
from convobot.template import format_prompt

TASK = "convobot_tasks"
TASK_YAML = Path(__file__).with_name("harness_task.yaml")


def require_harness_extra() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingExtraError("harness.tasks needs lm-evaluation-harness: pip install 'convobot[harness]'")


def heldout_task_rows() -> list[dict]:
    """The bundled data's held-out rows (the split convobot train holds out of data=bundled) as prompt/answer."""
    data = DataConfig()
    _, heldout = split_rows(load_rows(data)[0], data)
    return [{"prompt": format_prompt(row["instruction"], row.get("input", "")), "answer": row["output"]}
            for row in heldout]


def write_task(folder: Path) -> Path:
    """convobot_tasks' YAML and rows in `folder`, the harness's include_path."""
    rows = folder / "convobot_tasks.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in heldout_task_rows()), encoding="utf-8")
    (folder / TASK_YAML.name).write_text(TASK_YAML.read_text().replace("ROWS_FILE", json.dumps(str(rows))))
    return folder


def run_harness(bundle: str, cfg: HarnessConfig, device: str) -> dict:
    """lm_eval.simple_evaluate over `cfg.tasks` on the bundle; its output (results, configs, versions, samples)."""
    require_harness_extra()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(write_task(Path(tmp))))
        return simple_evaluate(model="hf", model_args={"pretrained": bundle, "dtype": "float32",
                                                       "trust_remote_code": False},
                               tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                               num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, device=device,
                               log_samples=True)
