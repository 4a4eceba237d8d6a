"""Run llama.cpp's own convert_hf_to_gguf.py, as a subprocess of convobot export-gguf:

    python -m convobot.release.llama_convert CONVERTER_DIR MODEL_DIR --outfile model-f32.gguf --outtype f32

One override: the converter names a BPE tokenizer's pre-tokenizer by hashing the ids it gives a test text, so a
vocabulary it has never seen (the embedded default's 512-token BPE) is refused even when its pre-tokenizer is
GPT-2's own. A tokenizer.json that declares GPT-2's byte-level pre-tokenizer (its regex, no prefix space, no
normalizer) is declared "gpt-2", which is what llama.cpp then splits text with; everything else goes through the
converter's hash table as usual. convobot export-gguf checks the token ids of the result against the tokenizer's.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def has_gpt2_pre_tokenizer(model_dir: Path) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    return spec.get("normalizer") is None and all(pre.get(key) == value for key, value in GPT2_PRE_TOKENIZER.items())


def main(argv: list[str]) -> None:
    converter_dir, model_dir, options = Path(argv[0]), Path(argv[1]), argv[2:]
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    from conversion.base import TextModel

    hashed = TextModel.get_vocab_base_pre
    gpt2 = has_gpt2_pre_tokenizer(model_dir)

    def get_vocab_base_pre(self, tokenizer) -> str:
        return "gpt-2" if gpt2 else hashed(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    sys.argv = [str(converter_dir / "convert_hf_to_gguf.py"), str(model_dir), *options]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
