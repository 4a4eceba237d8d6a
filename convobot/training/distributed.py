"""Multi-process glue. torchrun, `accelerate launch` and SLURM jobs start `convobot.training.recipe` once per rank and
the Trainer does the data parallelism; this module only settles what the ranks must agree on before the
Trainer exists, and (train.log_samples=true) records what each rank trained on.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m convobot.training.recipe experiment=smoke hydra.run.dir=outputs/ddp
    accelerate launch --cpu --num_processes=2 -m convobot.training.recipe experiment=smoke hydra.run.dir=outputs/ddp
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Iterable

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from convobot.scoring.checks import tensor_digest


def rank() -> int:
    """This process's rank under torchrun / accelerate launch / SLURM (0 when alone)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def export_submitit_env() -> None:
    """A submitit job with several tasks (Hydra's submitit launchers, tasks_per_node > 1) is one DDP run:
    give each task the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) that the Trainer reads."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)  # the Trainer picks cuda:LOCAL_RANK itself


def shared_run_dir(run_dir: Path, use_cpu: bool, backend: str | None) -> Path:
    """Rank 0's run dir, for every rank.

    Each rank runs Hydra's main, and a `${now:...}` run dir can differ by a second between ranks; but the
    ranks must share one folder (each writes its own rng_state_<rank>.pth into the checkpoints).
    A rank whose Hydra dir is not rank 0's removes it while it holds only Hydra's .hydra/ and log.
    """
    export_submitit_env()
    if world_size() == 1:
        return run_dir
    # Starts the process group with the arguments the Trainer would use (ddp_timeout's default); it reuses it.
    PartialState(cpu=use_cpu, backend=backend, timeout=timedelta(seconds=1800))
    chosen = [str(run_dir)]
    broadcast_object_list(chosen, from_process=0)
    shared = Path(chosen[0])
    if shared != run_dir and run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log"
                                                     for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def sample_hash(token_ids: torch.Tensor) -> str:
    return hashlib.sha1(token_ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:12]


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A digest of tensor values that ignores names and order (PEFT drops the adapter name when saving)."""
    digests = sorted(tensor_digest(t) for t in tensors)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class SampleLog(TrainerCallback):
    """samples/rank<N>.jsonl: per optimizer step, a hash and the non-padding token count of each sample
    this rank trained on; at the end, a fingerprint of the trained weights.

    Shows that ranks get disjoint shards, that a resumed run repeats and skips no step, that the token
    counts add up to the run's train_tokens, and that all replicas end with the weights rank 0 saved.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._pending: list[tuple[str, int]] = []
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.path = self.folder / f"rank{args.process_index}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._hook = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if not module.training:  # evaluation inside train()
            return
        mask = kwargs.get("attention_mask")
        for i, row in enumerate(kwargs["input_ids"]):
            kept = row if mask is None else row[mask[i].bool()]
            self._pending.append((sample_hash(kept), kept.numel()))

    def on_step_end(self, args, state, control, **kwargs):
        self._append({"step": state.global_step, "samples": [h for h, _ in self._pending],
                      "tokens": [n for _, n in self._pending]})
        self._pending = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._hook.remove()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._append({"step": state.global_step, "trainable_sha256": weights_fingerprint(trainable)})

    def _append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:  # one short write per line
            handle.write(json.dumps(record) + "\n")
