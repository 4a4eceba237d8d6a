"""Advice for a plan over budget (which change shrinks the dominant part, and a set that fits), and the check
convobot train runs before every CUDA run."""

from __future__ import annotations

import dataclasses
import logging

from convobot.config import LossHead, PeftMethod, Precision, TrainConfig
from convobot.errors import PlanError
from convobot.model.optim import optimizer_name
from convobot.plan.estimator import Plan, estimate
from convobot.plan.formulas import OPTIMIZERS, GiB

log = logging.getLogger(__name__)


def _change(cfg: TrainConfig, **overrides) -> tuple[dict, TrainConfig]:
    """`group__key=value` keyword pairs -> ({"group.key": value}, the changed config)."""
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        cfg = dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **{key: value})})
    return {dotted.replace("__", "."): value for dotted, value in overrides.items()}, cfg


def remedies(cfg: TrainConfig, part: str) -> list[tuple[dict, TrainConfig]]:
    """Overrides that shrink `part`, least disruptive first, each with the config it gives."""
    hw, options = cfg.hardware, []
    if part in ("activations", "block working set") and not hw.gradient_checkpointing:
        options.append(_change(cfg, hardware__gradient_checkpointing=True))
    if part in ("activations", "block working set") and cfg.model.attn_implementation == "eager":
        options.append(_change(cfg, model__attn_implementation="sdpa"))
    if part in ("activations", "block working set", "loss head") and hw.batch_size > 1 and not cfg.train.packing:
        # Same effective batch: half the rows per step, twice the accumulation.
        options.append(_change(cfg, hardware__batch_size=hw.batch_size // 2, hardware__grad_accum=hw.grad_accum * 2))
    if part == "eval logits" and hw.eval_tokens > cfg.data.max_length:
        options.append(_change(cfg, hardware__eval_tokens=max(cfg.data.max_length, hw.eval_tokens // 4)))
    optim_name = optimizer_name(cfg.optim.name, "cuda")  # only a card's budget is ever exceeded
    if part == "loss head" and hw.loss_head == LossHead.plain:
        options.append(_change(cfg, hardware__loss_head=LossHead.chunked))
    if part in ("optimizer states", "optimizer step temporaries") and OPTIMIZERS.get(optim_name, (32,))[0] == 32:
        options.append(_change(cfg, optim__name="adamw_bnb_8bit"))
    if part == "optimizer states" and not optim_name.startswith("paged"):
        options.append(_change(cfg, optim__name="paged_adamw_8bit"))
    if part in ("gradients", "optimizer states", "weights") and cfg.peft.method == PeftMethod.full:
        options.append(_change(cfg, peft__method=PeftMethod.lora))
    if part == "weights" and cfg.hardware.precision == Precision.fp32 and cfg.peft.method == PeftMethod.lora:
        options.append(_change(cfg, hardware__precision=Precision.fp16))
    if part in ("activations", "block working set", "loss head"):
        options.append(_change(cfg, data__max_length=cfg.data.max_length // 2))  # last: it truncates the data
    return options


def _overrides(changes: dict) -> str:
    """Command-line form: the optimizer and the method are picked through their groups (conf/optim/, conf/peft/)."""
    groups = {"optim.name": "optim", "peft.method": "peft"}
    names = {"adamw_bnb_8bit": "adamw_8bit"}
    words = []
    for key, value in changes.items():
        value = str(getattr(value, "value", value)).lower()
        words.append(f"{groups[key]}={names.get(value, value)}" if key in groups else f"{key}={value}")
    return " ".join(words)


def refusal(plan: Plan, cfg: TrainConfig) -> str:
    """Why the plan does not fit, which part dominates, what each change would give, and a set of
    changes that fits together (greedily: the first remedy that helps, for whatever dominates next)."""
    part = plan.dominant
    replan = lambda changed: estimate(changed, plan.device, budget_gb=plan.budget / GiB)  # noqa: E731
    lines = [
        f"{plan.title}: planned peak {plan.total / GiB:.2f} GiB ({plan.peak_phase}) exceeds "
        f"hardware.vram_gb={plan.budget / GiB:.1f} GiB by {(plan.total - plan.budget) / GiB:.2f} GiB.",
        f"The largest part is {part.name}: {part.bytes / GiB:.2f} GiB ({part.detail}).",
    ]
    options = [(changes, replan(changed)) for changes, changed in remedies(cfg, part.name)]
    if options:
        lines.append("Change one of:")
        lines += [f"  {_overrides(changes)}  -> {after.total / GiB:.2f} GiB ({'fits' if after.fits else 'still over'})"
                  for changes, after in options]
    together, steps, current, current_plan = {}, 0, cfg, plan
    while not current_plan.fits and steps < 6:
        for changes, changed in remedies(current, current_plan.dominant.name):
            after = replan(changed)
            if after.total < current_plan.total:
                together, steps, current, current_plan = {**together, **changes}, steps + 1, changed, after
                break
        else:
            break
    if current_plan.fits and steps > 1:
        lines.append(f"Together: {_overrides(together)}  -> {current_plan.total / GiB:.2f} GiB (fits)")
    lines.append("Or train anyway with hardware.allow_over_budget=true.")
    return "\n".join(lines)


def check_fits(cfg: TrainConfig, device: str, precision: Precision) -> Plan:
    """Plan a run about to start; raise PlanError if it exceeds the card (unless allowed)."""
    plan = estimate(cfg, device, precision)
    log.info("memory plan: %.2f GiB peak (%s) of %s", plan.total / GiB, plan.peak_phase,
             "no budget" if plan.budget is None else f"{plan.budget / GiB:.1f} GiB")
    if plan.fits:
        return plan
    message = refusal(plan, cfg)
    if not cfg.hardware.allow_over_budget:
        raise PlanError(message)
    log.warning("%s\nhardware.allow_over_budget=true: training anyway", message)
    return plan
