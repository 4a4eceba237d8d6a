"""Fine-tune GPT-2 with LoRA (or fully) on Alpaca-format instructions using TRL's SFTTrainer.

Examples:
    convobot-train                                  # tiny GPT-2 + bundled tasks, LoRA, CPU, offline
    convobot-train peft=full                        # same experiment, full fine-tune
    convobot-train experiment=smoke                 # a few steps, seconds
    convobot-train experiment=seed_repro            # GPT-2 small + vicgalle/alpaca-gpt4 (hub + GPU)
    convobot-train data=local data.path=rows.jsonl  # your own instruction/input/output file
    python -m convobot.train hydra.run.dir=outputs/mine
    convobot-train resume=true hydra.run.dir=outputs/mine              # continue an interrupted run
    torchrun --nproc_per_node=2 -m convobot.train hydra.run.dir=outputs/ddp  # data-parallel, one process per GPU

The recipe reads top to bottom: setup (data, model, optimizer) -> train -> save -> score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterable

import datasets
import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig, SFTTrainer

from convobot import (atomic, attention, cpu_memory, data, distributed, loss_head, metrics, modeling, resume, rundir,
                      scoring, tracking)
from convobot.callbacks import LossAndThroughputProgress, MetricsJsonl
from convobot.cli import one_line_errors
from convobot.config import CONF_DIR, DataFormat, DataSource, LossHead, ModelSource, Precision, TrainConfig, validate
from convobot.errors import ConfigError, SaveError
from convobot.generate import answer
from convobot.optim import OptimizerChoice, describe_optimizer, resolve_optimizer
from convobot.plan import check_fits
from convobot.results import print_results
from convobot.tasks import exact_match
from convobot.template import answer_of

log = logging.getLogger(__name__)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    if cfg.hardware.precision != Precision.fp32 and device.type == "cpu":
        log.warning("hardware.precision=%s needs a GPU; training in fp32 on CPU", cfg.hardware.precision.value)
        return Precision.fp32
    return cfg.hardware.precision


def build_sft_config(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: Precision,
                     optimizer: str) -> SFTConfig:
    """TRL's SFTConfig from the composed config (SFTConfig itself stays out of Hydra)."""
    hw, loop = cfg.hardware, cfg.train
    return SFTConfig(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        seed=cfg.seed,
        num_train_epochs=loop.epochs,
        max_steps=loop.max_steps,
        # Packed, a batch of B sequences is flattened into one of B*max_length tokens; B accumulated micro-batches
        # of one sequence train the same tokens per optimizer step (the loss is normalised over the whole step)
        # holding one sequence's activations at a time.
        per_device_train_batch_size=1 if loop.packing else hw.batch_size,
        per_device_eval_batch_size=hw.eval_batch_size,
        gradient_accumulation_steps=hw.grad_accum * (hw.batch_size if loop.packing else 1),
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_ratio,  # a float < 1 is a fraction of the total steps
        lr_scheduler_type=cfg.optim.scheduler,
        max_grad_norm=cfg.optim.max_grad_norm,
        optim=optimizer,
        # TRL defaults bf16 to True, which fails on CPU; precision is always explicit here.
        fp16=precision == Precision.fp16,
        bf16=precision == Precision.bf16,
        use_cpu=device.type == "cpu",
        activation_checkpointing=hw.gradient_checkpointing,
        torch_compile=hw.torch_compile,
        max_length=cfg.data.max_length,
        # Alpaca pairs: the loss on the completion; conversations: on the assistant turns, which the chat template
        # marks with {% generation %} (EOS included, so the model learns to end its turn).
        completion_only_loss=cfg.data.completion_only and cfg.data.format == DataFormat.alpaca,
        assistant_only_loss=cfg.data.completion_only and cfg.data.format != DataFormat.alpaca,
        # Packing fills each sequence with whole rows (best-fit decreasing) and no padding; position_ids restart at
        # 0 per row and no attention_mask is sent, so transformers' SDPA/eager masks become block-diagonal and rows
        # never attend to each other (tests/test_packing.py checks both this and the loss).
        packing=loop.packing,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if loop.group_by_length else "random",
        logging_steps=loop.logging_steps,
        eval_strategy="steps" if loop.eval_steps else "no",
        eval_steps=loop.eval_steps,
        save_strategy="steps",
        save_steps=loop.save_steps,
        save_total_limit=loop.keep_last,
        # keep_best: the lowest-eval-loss checkpoint survives rotation and is loaded back at the end (then saved).
        load_best_model_at_end=loop.keep_best,
        metric_for_best_model="eval_loss" if loop.keep_best else None,
        greater_is_better=False if loop.keep_best else None,
        # torchrun / accelerate launch: every parameter that trains is used in each forward, so DDP can skip
        # the search for unused ones (and its warning).
        ddp_backend=loop.ddp_backend,
        ddp_find_unused_parameters=False,
        # Packed batches have no attention_mask, so "non_padding" would count input_ids != pad, skipping every EOS
        # (GPT-2's pad is its EOS); they hold no padding at all, so counting every token is exact.
        include_num_input_tokens_seen="all" if loop.packing else "non_padding",
        dataloader_num_workers=hw.dataloader_workers,
        dataloader_persistent_workers=hw.dataloader_workers > 0,
        dataloader_pin_memory=device.type == "cuda",
        report_to="none",
    )


@contextlib.contextmanager
def torch_save_errors(run_dir: Path):
    """torch.save (the Trainer's optimizer and RNG state) reports a full disk as a RuntimeError from its zip writer;
    say it in one line. The half-written checkpoint has no trainer_state.json, so resume skips and removes it."""
    try:
        yield
    except RuntimeError as err:
        if "PytorchStreamWriter" not in str(err) and "inline_container" not in str(err):
            raise
        raise SaveError(f"could not write a checkpoint in {run_dir / rundir.CHECKPOINTS} (disk full?): "
                        f"{str(err).splitlines()[0]}") from err


def build_trainer(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: Precision, tokenizer,
                  dataset: data.InstructionData) -> tuple[SFTTrainer, OptimizerChoice]:
    """The model (base, dropout, LoRA), the optimizer and TRL's SFTTrainer for `cfg`: what `run` trains and
    benchmarks/train_throughput.py times."""
    dtype = modeling.base_dtype(precision, cfg.peft.method)
    if cfg.peft.quantization:  # QLoRA: the frozen base in 4 bits, computing in the precision's dtype
        from peft import prepare_model_for_kbit_training

        base = modeling.load_quantized_base(cfg.model, cfg.peft, dtype, device)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.hardware.gradient_checkpointing)
    else:
        base = modeling.load_base_model(cfg.model, tokenizer, dtype)
    modeling.prepare_for_training(base, cfg.model)
    if cfg.train.packing:
        attention.attend_row_by_row(base)  # the block-diagonal mask's maths, without its masked blocks
    model = modeling.apply_peft(base, cfg.peft, cfg.hardware.gradient_checkpointing)
    if precision == Precision.fp16:
        modeling.upcast_trainable_to_fp32(model)
    optimizer = resolve_optimizer(cfg.optim.name, device)
    args = build_sft_config(cfg, run_dir, device, precision, optimizer.name)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.train, eval_dataset=dataset.eval,
                         processing_class=tokenizer)
    if cfg.hardware.loss_head == LossHead.plain:
        loss_head.use_plain_head(base)  # TRL patched the base model, under the LoRA wrapper
    return trainer, optimizer


def score(model, tokenizer, dataset: data.InstructionData, cfg: TrainConfig) -> dict:
    """Held-out loss and perplexity, on what the loss trained (response only, or the full sequence); exact-match
    where answers can be checked (bundled tasks)."""
    both = scoring.perplexities(model, dataset.eval, tokenizer, cfg.data.max_length, cfg.hardware.eval_tokens)
    result = both["response" if cfg.data.completion_only else "full"]
    scores = {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_tokens": result["tokens"]}
    if cfg.data.source == DataSource.bundled and cfg.report.exact_match_rows > 0:
        checked = dataset.eval_rows[:cfg.report.exact_match_rows]
        predictions = answer(model, tokenizer, checked, cfg.report.max_new_tokens, cfg.hardware.eval_batch_size)
        scores["exact_match"] = exact_match(predictions, [answer_of(row) for row in checked])
    return scores


def run(cfg: TrainConfig, run_dir: Path, callbacks: Iterable[TrainerCallback] = (),
        sweep_dir: Path | None = None) -> dict:
    """Train one experiment into `run_dir` and return its metrics (also written to metrics.json).
    `callbacks` join the Trainer's (benchmarks and tests read memory and state through them); `sweep_dir` is the
    multirun this job belongs to (its tracker groups the jobs). The run dir belongs to this run while it lasts:
    rank 0 holds its lock."""
    run_dir = rundir.usable_dir(run_dir)
    with rundir.claimed(run_dir) if distributed.rank() == 0 else contextlib.nullcontext():
        return train_into(cfg, run_dir, list(callbacks), sweep_dir)


def train_into(cfg: TrainConfig, run_dir: Path, callbacks: list[TrainerCallback], sweep_dir: Path | None) -> dict:
    """The recipe, in a run dir this process owns."""
    checkpoint = resume.find_checkpoint(cfg.resume, run_dir)  # before any work: a wrong path fails at once
    # The tracker is reached before any work too: an unusable one fails now, not after training.
    tracker = tracking.open_tracking(cfg, run_dir, sweep_dir) if distributed.rank() == 0 else None
    if checkpoint is None and distributed.rank() == 0:
        # resume=auto found nothing to continue: what is there is an earlier attempt of this run (SLURM requeue).
        rundir.start_fresh(run_dir, overwrite=cfg.overwrite or cfg.resume == "auto")
    started = time.perf_counter()
    datasets.disable_progress_bars()  # one bar for the run: training
    set_seed(cfg.seed)
    device = modeling.resolve_device(cfg.hardware.device)
    precision = resolve_precision(cfg, device)
    if device.type == "cpu" and cfg.hardware.tune_malloc:
        cpu_memory.keep_freed_memory()
    if device.type == "cuda":  # refuse what the card cannot hold before loading anything (convobot-plan)
        check_fits(cfg, device.type, precision)

    # --- setup: data, model, optimizer
    max_length = modeling.fit_context(cfg.data.max_length, modeling.configured_context(cfg.model))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=max_length))
    resume_changes = resume.check_config(checkpoint, run_dir, cfg) if checkpoint else {}
    tokenizer = modeling.load_tokenizer(cfg.model.tokenizer, cfg.model.revision)
    dataset = data.prepare(cfg.data, tokenizer)
    trainer, optimizer = build_trainer(cfg, run_dir, device, precision, tokenizer, dataset)
    params = modeling.count_parameters(trainer.model)
    log.info("%s", params)
    # Killed after its last checkpoint but before saving: nothing is left to train, only to save and score.
    end = resume.end_of_training(trainer, checkpoint) if checkpoint else None
    if end and rundir.read_metrics(run_dir) is not None:
        raise ConfigError(f"config key 'resume': {checkpoint} already finished training (step {end[0]} of {end[1]}); "
                          "raise train.max_steps or train.epochs to train further")
    finishing = end is not None
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossAndThroughputProgress())
    trainer.add_callback(MetricsJsonl(run_dir / rundir.METRICS_LOG))
    if cfg.train.log_samples:
        trainer.add_callback(distributed.SampleLog(run_dir / rundir.SAMPLES))
    for callback in callbacks:
        trainer.add_callback(callback)
    is_main = trainer.is_world_process_zero()
    if is_main:
        rundir.write_config(run_dir, cfg)
        tracking.begin(tracker, cfg, run_dir)
        if tracker is not None:
            trainer.add_callback(tracking.TrackingCallback(tracker))
        rundir.write_heldout(run_dir, dataset.eval_rows)
        if cfg.model.source != ModelSource.hub:
            # A random-init base cannot be re-downloaded, and the bundled one may change with the package: keep
            # the base so the adapter can be merged later.
            rundir.save_model(run_dir / rundir.BASE_MODEL, modeling.load_base_model(cfg.model, tokenizer), tokenizer)

    before = score(trainer.model, tokenizer, dataset, cfg) if cfg.report.before and is_main else {}

    # --- train (from a checkpoint, the Trainer restores optimizer, scheduler, RNG and data position)
    resumed_step, resumed_tokens = resume.steps_and_tokens(checkpoint)
    if checkpoint and is_main:
        log.info("resuming from %s (step %d)", checkpoint, resumed_step)
        resume.rewind_run_dir(run_dir, resumed_step)
    if finishing:
        log.info("%s is the last step: saving and scoring it (the run stopped before it could)", checkpoint)
        train_loss, train_seconds = resume.load_finished(trainer, checkpoint), 0.0
    else:
        with atomic.saving(run_dir / rundir.CHECKPOINTS, "checkpoints in"), torch_save_errors(run_dir):
            train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_loss = train_output.training_loss
        train_seconds = train_output.metrics.get("train_runtime", time.perf_counter() - started)
    state = trainer.state

    # --- save (main process only; written to a temp folder, then renamed)
    if is_main:
        rundir.save_model(run_dir / rundir.weights_dirname(cfg.peft.method), trainer.model, tokenizer)

    # --- score
    after = score(trainer.model, tokenizer, dataset, cfg) if is_main else {}
    world = max(trainer.args.world_size, 1)
    results = {
        "experiment": cfg.experiment_name,
        "method": cfg.peft.method.value,
        "peft": cfg.peft.name,
        "train_loss": train_loss,
        **after,
        "before": before,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        # Tokens and steps are totals over all ranks and, after a resume, over all sessions; train_loss,
        # train_seconds and tokens/s cover this session only.
        "train_tokens": int(state.num_input_tokens_seen),
        "tokens_per_second": (state.num_input_tokens_seen - resumed_tokens) / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "steps": state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "resumed_from_step": resumed_step,
        "resume_changes": resume_changes,
        "best_checkpoint": state.best_model_checkpoint,
        "world_size": world,
        "effective_batch_size": cfg.hardware.batch_size * cfg.hardware.grad_accum * world,
        "peak_memory_bytes": metrics.peak_memory_bytes(device),
        "device": device.type,
        "precision": precision.value,
        "optimizer_requested": optimizer.requested,
        "optimizer": describe_optimizer(trainer.optimizer) if trainer.optimizer else optimizer.name,
        "optimizer_fallback_reason": optimizer.fallback_reason,
        "data": dataset.stats,
        "wall_seconds": time.perf_counter() - started,
        "versions": metrics.versions(),
    }
    if is_main:
        rundir.write_metrics(run_dir, results)
        tracking.end(tracker, results, run_dir)
        samples = dataset.eval_rows[:cfg.report.samples]
        generations = answer(trainer.model, tokenizer, samples, cfg.report.max_new_tokens) if samples else []
        print_results(results, run_dir, list(zip(samples, generations)))
    return results


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(raw: DictConfig) -> float:
    """Hydra entry point: `convobot-train [overrides]`. Returns eval loss (the sweep objective)."""
    hydra_cfg = HydraConfig.get()
    with one_line_errors("convobot-train", reraise=hydra_cfg.mode == RunMode.MULTIRUN):
        cfg = validate(raw)
        # Under torchrun / accelerate launch / SLURM every rank gets here; all use rank 0's run dir.
        use_cpu = modeling.resolve_device(cfg.hardware.device).type == "cpu"
        run_dir = distributed.shared_run_dir(Path(hydra_cfg.runtime.output_dir), use_cpu, cfg.train.ddp_backend)
        sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
        results = run(cfg, run_dir, sweep_dir=sweep_dir)
    return results.get("eval_loss", float("nan"))


if __name__ == "__main__":
    main()
