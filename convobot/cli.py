"""The command-line harness every convobot command shares: quiet libraries, a typed config, and user errors
(convobot/errors.py) as one line naming the key, file or row instead of a traceback.

    @hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="merge", version_base="1.3")
    def main(raw) -> None:
        run_command("convobot-merge", MergeConfig, merge, raw)
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from convobot.config import validate
from convobot.errors import UserError


@contextmanager
def one_line_errors(command: str, reraise: bool = False) -> Iterator[None]:
    """Exit with `<command>: <ErrorType>: <message>` (status 1) on a UserError; `reraise` passes it on instead
    (a multirun job: the sweeper records which job failed, and why)."""
    try:
        yield
    except UserError as err:
        if reraise:
            raise
        raise SystemExit(f"{command}: {type(err).__name__}: {err}") from err


def quiet_libraries() -> None:
    """Per-file "Loading weights" and per-dataset "Map" bars would bury a command's report."""
    import datasets
    import transformers

    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # peft still asks for the old name; transformers warns on every adapter load.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_command(command: str, schema: type, work: Callable, raw):
    """Run `work` on the composed config `raw`, checked against `schema` (conf/commands/)."""
    quiet_libraries()
    with one_line_errors(command):
        return work(validate(raw, schema))
