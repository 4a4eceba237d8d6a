"""When a multirun ends, summarise its jobs in the sweep dir (a Hydra callback).

Registered in conf/train.yaml under `hydra.callbacks`, so every sweep, with the basic sweeper or the
Optuna one, and with any launcher, ends with the same report `convobot compare` writes:

    convobot train -m peft=lora,full                        # -> <sweep dir>/summary.csv, summary.md, plots/
    convobot train -m peft=lora peft.r=4,8,16,32 optim.lr=1e-4,3e-4
    convobot train -m hparams_search=lora_optuna            # also lists Optuna's best trial

Each job writes its own metrics.json; this reads them back from the job dirs, so it also works when a
launcher ran the jobs in other processes or on other machines. A job that failed is listed as incomplete.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from convobot import atomic
from convobot.errors import CompareError
from convobot.reports import compare
from convobot.runs import tracking

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            runs = compare.load_runs([sweep_dir])
        except CompareError as err:
            log.warning("no sweep summary: %s", err)
            return
        summary = compare.write_report(runs, sweep_dir, "summary.md", f"sweep {sweep_dir}")
        optuna = sweep_dir / "optimization_results.yaml"
        if optuna.is_file():  # the Optuna sweeper's best trial, appended to the summary
            best = OmegaConf.load(optuna)
            params = " ".join(f"{key}={value}" for key, value in best.best_params.items())
            atomic.write_text(summary, summary.read_text()
                          + f"\n## Optuna best trial\n\neval loss {best.best_value:.4f} with `{params}`\n")
        log.info("sweep summary: %s (%d jobs)", summary, len(runs))
        tracking.close_sweep(sweep_dir, [summary, sweep_dir / "summary.csv", sweep_dir / "plots"])
