"""Answers scored against their references with the libraries LLaMA-Factory's and axolotl's evaluations use:
sacrebleu's BLEU and chrF and rouge-score's ROUGE-1/2/L F1, plus exact match (after whitespace normalisation, as
the bundled tasks check answers). All on a 0-100 scale.

The summary's BLEU and chrF are corpus-level (sacrebleu's corpus_bleu over every row, as papers report them); a
row's own BLEU uses sacrebleu's effective order, since a short answer rarely shares a 4-gram with its reference.
ROUGE and exact match are means over the rows.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

from convobot.data.tasks import normalize_answer
from convobot.errors import MissingExtraError
from convobot.scoring.generate import answer
from convobot.template import answer_of, prompt_of

METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")
ROUGE = ("rouge1", "rouge2", "rougeL")


def require_eval_extra() -> None:
    missing = [name for name in ("sacrebleu", "rouge_score") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"scoring answers needs {' and '.join(missing)}: pip install 'convobot[eval]'")


def score_answers(answers: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """The summary over all rows, and each row's own scores."""
    require_eval_extra()
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    if not answers:
        return {name: 0.0 for name in METRICS}, []
    rouge = rouge_scorer.RougeScorer(list(ROUGE))
    rows = []
    for text, reference in zip(answers, references):
        overlaps = rouge.score(reference, text)
        rows.append({"bleu": sacrebleu.sentence_bleu(text, [reference]).score,
                     "chrf": sacrebleu.sentence_chrf(text, [reference]).score,
                     **{name: 100 * overlaps[name].fmeasure for name in ROUGE},
                     "exact_match": 100.0 * (normalize_answer(text) == normalize_answer(reference))})
    summary = {"bleu": sacrebleu.corpus_bleu(answers, [references]).score,
               "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
               **{name: statistics.fmean(row[name] for row in rows) for name in (*ROUGE, "exact_match")}}
    return summary, rows


def answered_and_scored(model, tokenizer, rows: list[dict], max_new_tokens: int,
                        batch_size: int) -> tuple[dict, list[dict]]:
    """Greedy answers to rows (Alpaca rows, their prompt/completion examples or conversations) scored against their
    references: the summary (with how many prompts were cut to fit the context, and the seconds answering took),
    and one record per row: prompt, reference, answer and the row's scores."""
    require_eval_extra()
    started = time.perf_counter()
    answers = answer(model, tokenizer, rows, max_new_tokens, batch_size)
    seconds = time.perf_counter() - started
    references = [answer_of(row) for row in rows]
    summary, scores = score_answers(list(answers), references)
    records = [{"prompt": prompt_of(row, tokenizer), "reference": reference, "answer": text} | row_scores
               for row, reference, text, row_scores in zip(rows, references, answers, scores)]
    return summary | {"rows": len(rows), "prompts_cut": answers.cut, "max_new_tokens": max_new_tokens,
                      "seconds": seconds}, records
