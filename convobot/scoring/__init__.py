"""Scoring: how good a model is, and whether two models are the same.

    perplexity.py   full-sequence, response-only and sliding-window perplexity, streamed so that full-vocabulary
                    logits never exist for a whole batch
    generate.py     greedy answers to held-out rows in batches; generation settings; prompts fitted to the context
    answer_scores.py  answers scored against references: BLEU, chrF, ROUGE, exact match
    harness.py      lm-evaluation-harness on a bundle; convobot's offline task (harness_task.yaml)
    checks.py       logit comparisons that verify merged and exported models, weight digests
    measure.py      wall seconds per stage, peak memory, library versions
    evaluate.py     `convobot eval`: one model or base / adapter / merged side by side
"""
