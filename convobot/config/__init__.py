"""Configs: the typed schemas Hydra's composed configs are checked against, and the checking.

    training.py     conf/train.yaml and its groups (model, data, peft, optim, hardware, stage, train, report, logger)
    commands.py     conf/commands/*.yaml: merge, eval, export-onnx, export-gguf, chat, serve
    validation.py   compose with Hydra, validate onto a schema (one line naming the key), flatten

Everything is importable from `convobot.config`; nothing here imports torch.
"""

from convobot.config.commands import (
                                      COMMAND_SCHEMAS,
                                      ChatConfig,
                                      EvalConfig,
                                      EvalRows,
                                      ExportConfig,
                                      GenerationOptions,
                                      GGUFConfig,
                                      HarnessConfig,
                                      MergeConfig,
                                      ServeConfig,
                                      SlidingConfig,
)
from convobot.config.training import (
                                      CONVERSATION_FORMATS,
                                      PREFERENCE_FORMATS,
                                      STAGE_FORMATS,
                                      BadRowPolicy,
                                      DataConfig,
                                      DataFormat,
                                      DataSource,
                                      Device,
                                      HardwareConfig,
                                      LoggerConfig,
                                      LossHead,
                                      ModelConfig,
                                      ModelSource,
                                      OptimConfig,
                                      PeftConfig,
                                      PeftMethod,
                                      Precision,
                                      ReportConfig,
                                      Stage,
                                      StageConfig,
                                      Tracker,
                                      TrainConfig,
                                      TrainLoopConfig,
)
from convobot.config.validation import (
                                      COMMANDS_CONF_DIR,
                                      CONF_DIR,
                                      compose,
                                      compose_command,
                                      flatten,
                                      to_container,
                                      validate,
)

__all__ = [
    "BadRowPolicy", "CONVERSATION_FORMATS", "PREFERENCE_FORMATS", "STAGE_FORMATS", "Stage", "StageConfig",
    "COMMANDS_CONF_DIR", "COMMAND_SCHEMAS", "CONF_DIR", "ChatConfig", "DataConfig", "DataFormat",
    "DataSource", "Device", "EvalConfig", "EvalRows", "ExportConfig", "GGUFConfig", "GenerationOptions",
    "HardwareConfig", "HarnessConfig", "LoggerConfig", "LossHead", "MergeConfig", "ModelConfig", "ModelSource", "OptimConfig",
    "PeftConfig", "PeftMethod", "Precision", "ReportConfig", "ServeConfig", "SlidingConfig", "Tracker", "TrainConfig",
    "TrainLoopConfig", "compose", "compose_command", "flatten", "to_container", "validate",
]
