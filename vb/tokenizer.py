"""The OpenAI CLIP tokenizer without a download (``vb.clip_tokenizer``)."""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The OpenAI CLIP tokenizer (49408 tokens) as a ``transformers.CLIPTokenizer``, rebuilt from
    the BPE merges that open_clip ships inside its package, so no download is needed.

    The vocabulary is built the way CLIP's own tokenizer builds it: the 256 byte symbols, the
    same with the end-of-word mark, one entry per merge, then the start and end tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # CLIP keeps the first 48894 merges
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as fh:
            json.dump({tok: i for i, tok in enumerate(vocab)}, fh)
        with open(merges_file, "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # Positional: transformers 4 names these vocab_file/merges_file, 5 names them vocab/merges.
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
