"""Training: the recipe that turns a composed config into a trained adapter or model in a run dir.

    recipe.py       `convobot train`: setup (data, model, optimizer) -> train with TRL's SFTTrainer -> save -> score
    stages.py       DPO, ORPO, KTO and GRPO (exact-match reward) through TRL's trainers, and their metrics
    lineage.py      init_from: a stage starting from the model an earlier run computes, and the chain it records
    callbacks.py    the progress bar (loss, tokens/s), metrics.jsonl and step metrics to the tracker
    resume.py       which checkpoint an interrupted run continues from, and tidying the run dir first
    distributed.py  what torchrun / accelerate / SLURM ranks agree on, and per-rank sample logs
    results.py      the one-screen results table printed at the end of a run
    pretrain.py     how the embedded default's tiny base was pretrained (`make pretrain`)
"""
