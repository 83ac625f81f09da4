"""The tokenizer builder: a CLIPTokenizer whose BPE merges make every word of a word list one token.

One builder serves the Shapes teacher (the grammar's words) and the tests' tiny pipeline (its own list). The
vocabulary is laid out as CLIP's is: the letters, each letter with CLIP's `</w>` word ending, the merges, then
the two special tokens last.
"""

from __future__ import annotations

import json
from pathlib import Path

from .grammar import VOCAB

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # bos + 11 caption words + eos fits; StableDiffusionPipeline pads to this length


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on the word list until every word is one symbol (CLIP's `</w>` word ending)."""
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs.values():
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], p))  # ties broken deterministically
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(out_dir: str | Path, words: list[str] | tuple[str, ...] = VOCAB,
                    model_max_length: int = MAX_LENGTH):
    """A CLIPTokenizer in which every word of `words` is one token; saved to (and loaded from) out_dir.

    Other words fall back to letters; a character outside a-z and the words' letters becomes the EOS token.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges(list(words))
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    symbols = letters + [c + "</w>" for c in letters]
    for a, b in merges:  # every merge result must be in the vocabulary
        if a + b not in symbols:
            symbols.append(a + b)
    vocab = {s: i for i, s in enumerate(symbols + [BOS, EOS])}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=model_max_length,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    tok.save_pretrained(str(out))
    return CLIPTokenizer.from_pretrained(str(out))
