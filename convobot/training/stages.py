"""Preference and reward stages through TRL's trainers: DPO, ORPO, KTO and GRPO with a verifiable reward.

    convobot train stage=dpo data=bundled_preferences init_from=outputs/sft      # SFT, then DPO on top
    convobot train stage=grpo init_from=outputs/sft                              # rewarded by exact match
    convobot train stage=orpo data=bundled_preferences peft=full                 # from the base, no reference

Each stage's trainer gets the same TrainingArguments as SFT (optimizer, precision, checkpoints, logging, DDP) plus
the options of conf/stage/<stage>.yaml. With an adapter the trainer wraps the base itself (peft_config), so the
reference is the base with the adapter disabled: no second copy. With peft=full, DPO and KTO get a frozen copy of
the starting model (or none with stage.precompute_ref_log_probs), GRPO loads one from the base's folder.
"""

from __future__ import annotations

import copy

from convobot.config import PeftMethod, Stage, TrainConfig
from convobot.data.examples import InstructionData
from convobot.data.tasks import normalize_answer
from convobot.errors import ConfigError

# What each trainer logs beside the loss, kept at their last logged values in metrics.json (`stage_metrics`).
STAGE_METRICS = ("rewards/", "logps/", "kl", "reward", "reward_std", "log_odds_ratio", "log_odds_chosen", "nll_loss",
                 "completions/mean_length")


def exact_match_reward(completions: list[str], reference: list[str], **_) -> list[float]:
    """GRPO's verifiable reward: 1 for an answer equal to the row's (whitespace-normalised), else 0. TRL passes the
    dataset's `reference` column; completions end at EOS, which decoding drops."""
    return [float(normalize_answer(answer) == normalize_answer(expected))
            for answer, expected in zip(completions, reference, strict=True)]


def stage_args(cfg: TrainConfig, common: dict):
    """TRL's config for the stage: the shared TrainingArguments plus the stage's own options."""
    # Imported here: these trainers' modules pull in much (an installed mlflow among it) that SFT runs never use.
    from trl import DPOConfig, GRPOConfig, KTOConfig

    stage = cfg.stage
    loss = {"loss_type": stage.loss_type} if stage.loss_type else {}
    if stage.name == Stage.dpo:  # DPO takes a list of losses, weighted
        loss = {"loss_type": [stage.loss_type or "sigmoid"]}
        if stage.sft_weight > 0:  # RPO: the preference loss plus an SFT loss on the chosen answers
            loss = {"loss_type": [*loss["loss_type"], "sft"], "loss_weights": [1.0, stage.sft_weight]}
        return DPOConfig(**common, **loss, beta=stage.beta, max_length=cfg.data.max_length,
                         precompute_ref_log_probs=stage.precompute_ref_log_probs)
    if stage.name == Stage.orpo:
        from trl.experimental.orpo import ORPOConfig

        # Its collator reads the prompt / chosen / rejected columns the Trainer would otherwise drop first.
        return ORPOConfig(**common, beta=stage.beta, max_length=cfg.data.max_length, remove_unused_columns=False)
    if stage.name == Stage.kto:
        # KTO's KL estimate pairs each example with its neighbour in a fixed-order batch: TRL refuses random
        # sampling, so the rows come shuffled (seeded) from the data instead.
        common = common | {"train_sampling_strategy": "sequential"}
        return KTOConfig(**common, **loss, beta=stage.beta, max_length=cfg.data.max_length,
                         precompute_ref_log_probs=stage.precompute_ref_log_probs,
                         desirable_weight=stage.desirable_weight, undesirable_weight=stage.undesirable_weight)
    return GRPOConfig(**common, **loss, beta=stage.beta, num_generations=stage.num_generations,
                      max_completion_length=stage.max_completion_length, temperature=stage.temperature,
                      log_completions=False)


def build_stage_trainer(cfg: TrainConfig, common: dict, base, tokenizer, dataset: InstructionData, peft_config):
    """TRL's trainer for cfg.stage on `base` (unwrapped: the trainer adds the adapter from `peft_config`)."""
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    args = stage_args(cfg, common)
    data = {"train_dataset": dataset.train, "eval_dataset": dataset.trainer_eval, "processing_class": tokenizer,
            "peft_config": peft_config}
    full = cfg.peft.method == PeftMethod.full
    if cfg.stage.name == Stage.grpo:
        if full and cfg.stage.beta > 0 and not getattr(base.config, "_name_or_path", ""):
            raise ConfigError("config key 'stage.beta': GRPO with peft=full loads its reference from the base's "
                              "folder, and this base was built in memory (model.source=random): set stage.beta=0 or "
                              "use an adapter")
        return GRPOTrainer(model=base, reward_funcs=[exact_match_reward], args=args, **data)
    if cfg.stage.name == Stage.orpo:
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer(model=base, args=args, **data)
    # Full fine-tuning: a frozen copy of the starting model is the reference (none when its log-probabilities
    # are computed once up front).
    reference = None
    if full and not cfg.stage.precompute_ref_log_probs:
        reference = copy.deepcopy(base).eval().requires_grad_(False)
    trainer_class = DPOTrainer if cfg.stage.name == Stage.dpo else KTOTrainer
    return trainer_class(model=base, ref_model=reference, args=args, **data)


def stage_metrics(log_history: list[dict]) -> dict[str, float]:
    """The stage's own metrics (reward accuracy and margins, KL, mean reward, ...) at their last logged values."""
    found = {}
    for record in log_history:
        for key, value in record.items():
            if key.startswith(STAGE_METRICS) and not key.startswith("eval_") and isinstance(value, (int, float)):
                found[key] = float(value)
    return found
