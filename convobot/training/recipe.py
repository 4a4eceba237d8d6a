"""Fine-tune GPT-2 with LoRA (or fully) on Alpaca-format instructions using TRL's SFTTrainer.

Examples:
    convobot train                                  # tiny GPT-2 + bundled tasks, LoRA, CPU, offline
    convobot train peft=full                        # same experiment, full fine-tune
    convobot train experiment=smoke                 # a few steps, seconds
    convobot train experiment=seed_repro            # GPT-2 small + vicgalle/alpaca-gpt4 (hub + GPU)
    convobot train data=local data.path=rows.jsonl  # your own instruction/input/output file
    convobot train stage=dpo data=bundled_preferences init_from=outputs/mine   # DPO on top (training/stages.py)
    python -m convobot.training.recipe hydra.run.dir=outputs/mine
    convobot train resume=true hydra.run.dir=outputs/mine              # continue an interrupted run
    torchrun --nproc_per_node=2 -m convobot.training.recipe hydra.run.dir=outputs/ddp  # data-parallel, one process per GPU

The recipe reads top to bottom: setup (data, model, optimizer) -> train -> save -> score. `stage=` picks the
objective: SFT here, DPO / ORPO / KTO / GRPO through TRL's trainer for each (stages.py).
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
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig, SFTTrainer

from convobot import atomic
from convobot.cli import one_line_errors, quiet_libraries
from convobot.config import (
    CONF_DIR,
    DataFormat,
    DataSource,
    LossHead,
    ModelSource,
    Precision,
    Stage,
    TrainConfig,
    validate,
)
from convobot.data.examples import InstructionData, prepare_stage
from convobot.data.tasks import exact_match
from convobot.errors import AdapterError, ConfigError, SaveError
from convobot.model import attention, cpu_memory, loss_head
from convobot.model.adapters import apply_peft, check_targets_exist, lora_config
from convobot.model.base import (
    base_dtype,
    configured_context,
    count_parameters,
    fit_context,
    load_base_model,
    prepare_for_training,
    resolve_device,
    upcast_trainable_to_fp32,
)
from convobot.model.optim import OptimizerChoice, describe_optimizer, resolve_optimizer
from convobot.model.quantize import load_quantized_base
from convobot.model.tokenizer import load_tokenizer
from convobot.plan import check_fits
from convobot.runs import rundir, tracking
from convobot.scoring.answer_scores import answered_and_scored, require_eval_extra
from convobot.scoring.generate import Answers, answer
from convobot.scoring.measure import peak_memory_bytes, versions
from convobot.scoring.perplexity import perplexities
from convobot.template import answer_of
from convobot.training import distributed, lineage, resume
from convobot.training.callbacks import LossAndThroughputProgress, MetricsJsonl, TrackingCallback
from convobot.training.results import print_results
from convobot.training.stages import build_stage_trainer, stage_metrics

log = logging.getLogger(__name__)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    if cfg.hardware.precision != Precision.fp32 and device.type == "cpu":
        log.warning("hardware.precision=%s needs a GPU; training in fp32 on CPU", cfg.hardware.precision.value)
        return Precision.fp32
    return cfg.hardware.precision


def build_sft_config(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: Precision,
                     optimizer: str) -> SFTConfig:
    """TRL's SFTConfig from the composed config (SFTConfig itself stays out of Hydra)."""
    return SFTConfig(
        **trainer_args(cfg, run_dir, device, precision, optimizer),
        max_length=cfg.data.max_length,
        # Alpaca pairs: the loss on the completion; conversations: on the assistant turns, which the chat template
        # marks with {% generation %} (EOS included, so the model learns to end its turn).
        completion_only_loss=cfg.data.completion_only and cfg.data.format == DataFormat.alpaca,
        assistant_only_loss=cfg.data.completion_only and cfg.data.format != DataFormat.alpaca,
        # Packing fills each sequence with whole rows (best-fit decreasing) and no padding; position_ids restart at
        # 0 per row and no attention_mask is sent, so transformers' SDPA/eager masks become block-diagonal and rows
        # never attend to each other (tests/test_packing.py checks both this and the loss).
        packing=cfg.train.packing,
        packing_strategy="bfd",
    )


def trainer_args(cfg: TrainConfig, run_dir: Path, device: torch.device, precision: Precision, optimizer: str) -> dict:
    """The TrainingArguments every stage's TRL config shares: loop, optimizer, precision, checkpoints, DDP."""
    hw, loop = cfg.hardware, cfg.train
    return dict(
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
        neftune_noise_alpha=loop.neftune_alpha,
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
                  dataset: InstructionData) -> tuple[Trainer, OptimizerChoice]:
    """The model (base, dropout, LoRA), the optimizer and TRL's trainer for the stage (SFTTrainer for SFT): what
    `run` trains and benchmarks/train_throughput.py times."""
    dtype = base_dtype(precision, cfg.peft.method)
    if cfg.peft.quantization:  # QLoRA: the frozen base in 4 bits, computing in the precision's dtype
        from peft import prepare_model_for_kbit_training

        base = load_quantized_base(cfg.model, cfg.peft, dtype, device)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.hardware.gradient_checkpointing)
    else:
        base = load_base_model(cfg.model, tokenizer, dtype)
    prepare_for_training(base, cfg.model)
    if cfg.stage.name != Stage.sft:
        optimizer = resolve_optimizer(cfg.optim.name, device)
        return build_stage(cfg, trainer_args(cfg, run_dir, device, precision, optimizer.name), base, tokenizer,
                           dataset, precision), optimizer
    if cfg.train.packing:
        attention.attend_row_by_row(base)  # the block-diagonal mask's maths, without its masked blocks
    model = apply_peft(base, cfg.peft, cfg.hardware.gradient_checkpointing)
    if precision == Precision.fp16:
        upcast_trainable_to_fp32(model)
    # After the adapter's random init: probing an 8-bit optimizer draws random numbers.
    optimizer = resolve_optimizer(cfg.optim.name, device)
    args = build_sft_config(cfg, run_dir, device, precision, optimizer.name)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.train, eval_dataset=dataset.eval,
                         processing_class=tokenizer)
    if cfg.hardware.loss_head == LossHead.plain:
        loss_head.use_plain_head(base)  # TRL patched the base model, under the LoRA wrapper
    return trainer, optimizer


def build_stage(cfg: TrainConfig, args: dict, base, tokenizer, dataset: InstructionData,
                precision: Precision) -> Trainer:
    """A preference or reward stage's trainer; with an adapter, the trainer wraps the base (the reference is the base
    with the adapter disabled), after the same checks as SFT's wrapping."""
    peft_config = None
    if cfg.peft.adapter:
        check_targets_exist(base, cfg.peft.target_modules)
        peft_config = lora_config(cfg.peft)
    trainer = build_stage_trainer(cfg, args, base, tokenizer, dataset, peft_config)
    if count_parameters(trainer.model).trainable == 0:
        raise AdapterError(f"the {cfg.stage.name.value} stage has zero trainable parameters "
                           f"(peft.target_modules {list(cfg.peft.target_modules)})")
    if precision == Precision.fp16 and cfg.peft.adapter:
        upcast_trainable_to_fp32(trainer.model)
    return trainer


def score(model, tokenizer, dataset: InstructionData, cfg: TrainConfig) -> tuple[dict, list[dict]]:
    """Held-out loss and perplexity, on what the loss trained (response only, or the full sequence); exact-match
    where answers can be checked (bundled tasks); answers to held-out rows scored against their references
    (report.generate_metrics), with those answers."""
    both = perplexities(model, dataset.eval, tokenizer, cfg.data.max_length, cfg.hardware.eval_tokens)
    result = both["response" if cfg.data.completion_only else "full"]
    scores = {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_tokens": result["tokens"]}
    if cfg.data.source == DataSource.bundled and cfg.report.exact_match_rows > 0:
        checked = dataset.eval_rows[:cfg.report.exact_match_rows]
        predictions = answer(model, tokenizer, checked, cfg.report.max_new_tokens, cfg.hardware.eval_batch_size)
        scores["exact_match"] = exact_match(predictions, [answer_of(row) for row in checked])
    records = []
    if cfg.report.generate_metrics:
        scores["answers"], records = answered_and_scored(model, tokenizer, dataset.eval_rows[:cfg.report.generate_rows],
                                                         cfg.report.max_new_tokens, cfg.hardware.eval_batch_size)
    return scores, records


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
    """The recipe, in a run dir this process owns: setup -> train -> save -> score."""
    checkpoint = resume.find_checkpoint(cfg.resume, run_dir)  # before any work: a wrong path fails at once
    if cfg.report.generate_metrics:
        require_eval_extra()  # before training, not after it
    # The tracker is reached before any work too: an unusable one fails now, not after training.
    tracker = tracking.open_tracking(cfg.logger, run_dir, sweep_dir) if distributed.rank() == 0 else None
    if checkpoint is None and distributed.rank() == 0:
        # resume=auto found nothing to continue: what is there is an earlier attempt of this run (SLURM requeue).
        rundir.start_fresh(run_dir, overwrite=cfg.overwrite or cfg.resume == "auto")
    started = time.perf_counter()

    # --- setup: data, model, optimizer
    try:
        job = set_up(cfg, run_dir, checkpoint)
    except BaseException:
        if checkpoint is None and distributed.rank() == 0:
            lineage.discard_start(run_dir)  # a fresh start that failed leaves its run dir as it found it
        raise
    for callback in [*job_callbacks(job.cfg, run_dir, tracker), *callbacks]:
        job.trainer.add_callback(callback)
    if job.is_main:
        record_start(job, run_dir, tracker)
    before = score(job.trainer.model, job.tokenizer, job.dataset, job.cfg)[0] \
        if job.cfg.report.before and job.is_main else {}

    # --- train (from a checkpoint, the Trainer restores optimizer, scheduler, RNG and data position)
    resumed = resume.steps_and_tokens(checkpoint)  # read now: rotation may delete the checkpoint while training
    train_loss, train_seconds = train(job, checkpoint, resumed[0], run_dir, started)

    # --- save (main process only; written to a temp folder, then renamed)
    if job.is_main:
        rundir.save_model(run_dir / rundir.weights_dirname(job.cfg.peft.method), job.trainer.model, job.tokenizer)

    # --- score
    after, predictions = score(job.trainer.model, job.tokenizer, job.dataset, job.cfg) if job.is_main else ({}, [])
    results = collect_results(job, checkpoint, resumed, train_loss, train_seconds, before, after, started)
    if job.is_main:
        if predictions:
            rundir.write_predictions(run_dir, predictions)
        rundir.write_metrics(run_dir, results)
        tracking.end(tracker, results, run_dir)
        samples = job.dataset.eval_rows[:job.cfg.report.samples]
        generations = answer(job.trainer.model, job.tokenizer, samples, job.cfg.report.max_new_tokens) \
            if samples else Answers()
        print_results(results, run_dir, list(zip(samples, generations)), cut=generations.cut)
    return results


@dataclasses.dataclass
class Job:
    """One training job, set up: its config as it runs (rows cut to the context), where, and with what."""
    cfg: TrainConfig
    device: torch.device
    precision: Precision
    tokenizer: object
    dataset: InstructionData
    trainer: SFTTrainer
    optimizer: OptimizerChoice
    params: object  # ParamCount
    resume_changes: dict
    finishing: bool  # killed after its last checkpoint: nothing left to train, only to save and score

    @property
    def is_main(self) -> bool:
        return self.trainer.is_world_process_zero()


def set_up(cfg: TrainConfig, run_dir: Path, checkpoint: Path | None) -> Job:
    """Seed, device and precision, data, model and trainer; a resume's config checked against the saved one."""
    datasets.disable_progress_bars()  # one bar for the run: training
    set_seed(cfg.seed)
    if cfg.init_from:  # the earlier run's model becomes this run's base (saved once; a resume finds it)
        cfg = lineage.start_from(cfg, run_dir)
    device = resolve_device(cfg.hardware.device)
    precision = resolve_precision(cfg, device)
    if device.type == "cpu" and cfg.hardware.tune_malloc:
        cpu_memory.keep_freed_memory()
    if device.type == "cuda":  # refuse what the card cannot hold before loading anything (convobot plan)
        check_fits(cfg, device.type, precision)
    max_length = fit_context(cfg.data.max_length, configured_context(cfg.model))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=max_length))
    resume_changes = resume.check_config(checkpoint, run_dir, cfg) if checkpoint else {}
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.revision)
    dataset = prepare_stage(cfg.data, tokenizer, cfg.stage.name)
    trainer, optimizer = build_trainer(cfg, run_dir, device, precision, tokenizer, dataset)
    params = count_parameters(trainer.model)
    log.info("%s", params)
    end = resume.end_of_training(trainer, checkpoint) if checkpoint else None
    if end and rundir.read_metrics(run_dir) is not None:
        raise ConfigError(f"config key 'resume': {checkpoint} already finished training (step {end[0]} of {end[1]}); "
                          "raise train.max_steps or train.epochs to train further")
    trainer.remove_callback(ProgressCallback)
    return Job(cfg, device, precision, tokenizer, dataset, trainer, optimizer, params, resume_changes, end is not None)


def job_callbacks(cfg: TrainConfig, run_dir: Path, tracker) -> list[TrainerCallback]:
    """The progress bar, metrics.jsonl, the per-rank sample log and the tracker's step metrics."""
    found = [LossAndThroughputProgress(), MetricsJsonl(run_dir / rundir.METRICS_LOG)]
    if cfg.train.log_samples:
        found.append(distributed.SampleLog(run_dir / rundir.SAMPLES))
    if tracker is not None:
        found.append(TrackingCallback(tracker))
    return found


def record_start(job: Job, run_dir: Path, tracker) -> None:
    """What the run dir holds before training: the config, the held-out rows, a base that cannot be downloaded."""
    rundir.write_config(run_dir, job.cfg)
    tracking.begin(tracker, job.cfg, run_dir)
    rundir.write_heldout(run_dir, job.dataset.eval_rows)
    if job.cfg.model.source not in (ModelSource.hub, ModelSource.run):
        # A random-init base cannot be re-downloaded, and the bundled one may change with the package: keep
        # the base so the adapter can be merged later.
        rundir.save_model(run_dir / rundir.BASE_MODEL, load_base_model(job.cfg.model, job.tokenizer), job.tokenizer)


def train(job: Job, checkpoint: Path | None, resumed_step: int, run_dir: Path, started: float) -> tuple[float, float]:
    """Train (or, killed after the last checkpoint, load it); returns the mean training loss and the seconds."""
    if checkpoint and job.is_main:
        log.info("resuming from %s (step %d)", checkpoint, resumed_step)
        resume.rewind_run_dir(run_dir, resumed_step)
    if job.finishing:
        log.info("%s is the last step: saving and scoring it (the run stopped before it could)", checkpoint)
        return resume.load_finished(job.trainer, checkpoint), 0.0
    try:
        with atomic.saving(run_dir / rundir.CHECKPOINTS, "checkpoints in"), torch_save_errors(run_dir):
            output = job.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        for callback in job.trainer.callback_handler.callbacks:
            if isinstance(callback, LossAndThroughputProgress):
                callback.close()
    return output.training_loss, output.metrics.get("train_runtime", time.perf_counter() - started)


def collect_results(job: Job, checkpoint: Path | None, resumed: tuple[int, int], train_loss: float,
                    train_seconds: float, before: dict, after: dict, started: float) -> dict:
    """metrics.json: the held-out scores, what trained, how fast, in how much memory, with what."""
    cfg, state, trainer = job.cfg, job.trainer.state, job.trainer
    resumed_step, resumed_tokens = resumed
    world = max(trainer.args.world_size, 1)
    return {
        "experiment": cfg.experiment_name,
        "method": cfg.peft.method_name,
        "peft": cfg.peft.name,
        "stage": cfg.stage.name.value,
        "lineage": lineage.lineage(cfg),
        "train_loss": train_loss,
        **after,
        "stage_metrics": stage_metrics(state.log_history),
        "before": before,
        "trainable_params": job.params.trainable,
        "total_params": job.params.total,
        "trainable_percent": job.params.percent,
        # Tokens and steps are totals over all ranks and, after a resume, over all sessions; train_loss,
        # train_seconds and tokens/s cover this session only.
        **trained_tokens(state, resumed_tokens, train_seconds),
        "train_seconds": train_seconds,
        "steps": state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "resumed_from_step": resumed_step,
        "resume_changes": job.resume_changes,
        "best_checkpoint": state.best_model_checkpoint,
        "world_size": world,
        "effective_batch_size": cfg.hardware.batch_size * cfg.hardware.grad_accum * world,
        "peak_memory_bytes": peak_memory_bytes(job.device),
        "device": job.device.type,
        "precision": job.precision.value,
        "optimizer_requested": job.optimizer.requested,
        "optimizer": describe_optimizer(trainer.optimizer) if trainer.optimizer else job.optimizer.name,
        "optimizer_fallback_reason": job.optimizer.fallback_reason,
        "data": job.dataset.stats,
        "wall_seconds": time.perf_counter() - started,
        "versions": versions(),
    }


def trained_tokens(state, resumed_tokens: int, train_seconds: float) -> dict:
    """Tokens trained and per second; None where the trainer counted none while training steps (ORPO's batches
    hold no `input_ids` for the Trainer to count)."""
    if state.num_input_tokens_seen == 0 and state.global_step > 0:
        return {"train_tokens": None, "tokens_per_second": None}
    return {"train_tokens": int(state.num_input_tokens_seen),
            "tokens_per_second": (state.num_input_tokens_seen - resumed_tokens) / train_seconds if train_seconds
            else 0.0}


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(raw: DictConfig) -> float:
    """Hydra entry point: `convobot train [overrides]`. Returns eval loss (the sweep objective)."""
    hydra_cfg = HydraConfig.get()
    quiet_libraries()
    with one_line_errors("convobot-train", reraise=hydra_cfg.mode == RunMode.MULTIRUN):
        cfg = validate(raw)
        # Under torchrun / accelerate launch / SLURM every rank gets here; all use rank 0's run dir.
        use_cpu = resolve_device(cfg.hardware.device).type == "cpu"
        run_dir = distributed.shared_run_dir(Path(hydra_cfg.runtime.output_dir), use_cpu, cfg.train.ddp_backend)
        sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
        results = run(cfg, run_dir, sweep_dir=sweep_dir)
    return results.get("eval_loss", float("nan"))


if __name__ == "__main__":
    main()
