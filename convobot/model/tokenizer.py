"""Tokenizers: the bundled 512-token byte-level BPE of the embedded default, or a hub / local one; every tokenizer
convobot hands out carries convobot's chat template (the format every convobot model is trained on and prompted
with).

    python -m convobot.model.tokenizer     # rebuild the shipped tokenizer (convobot/assets/tokenizer/)
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from convobot.data.tasks import generate_rows
from convobot.template import format_example, with_chat_template

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The bundled task tokenizer, or a hub id / local folder, with convobot's chat template (the format every
    convobot model is trained on and prompted with). GPT-2 has no pad token: pad = eos."""
    source = BUNDLED_TOKENIZER_DIR if name == "bundled" else name
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_chat_template(tokenizer)


def train_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer for the bundled tasks (GPT-2's scheme, smaller vocab).

    GPT-2's real 50,257-token vocab would make the tiny model's embedding and softmax dominate
    its compute on CPU; a 512-token BPE trained on the task rows keeps the default run fast.
    Byte-level means any text still encodes (no unknown tokens).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = []
    for row in generate_rows(4000, seed=12345):
        pair = format_example(row)
        texts.append(pair["prompt"] + pair["completion"])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN])
    # GPT-2 convention: one special token serving as bos, eos and pad.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        model_max_length=1024,
    )


if __name__ == "__main__":
    train_tokenizer().save_pretrained(BUNDLED_TOKENIZER_DIR)
    print(f"wrote {BUNDLED_TOKENIZER_DIR}")
