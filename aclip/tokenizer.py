"""CLIP byte-pair-encoding tokenizer (open_clip's vocabulary, shipped in the package)."""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer


def _sanitize(text: object) -> str:
    """Turn any caption-like value into a str that UTF-8 can encode (lone surrogates replaced)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    return text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")


class Tokenizer:
    """SOT + BPE + EOT ids, zero padded to ``context_length``.

    Cleaning (ftfy, HTML unescape, whitespace normalisation, lower case) is open_clip's
    ``SimpleTokenizer.encode``; values it could not encode (lone surrogates, bytes, None) are
    sanitised first, so an odd caption never crashes a run. Too-long captions are truncated
    with the EOT id kept as the last token (the text tower pools at the EOT position).
    """

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (got {context_length})")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size: int = self._bpe.vocab_size
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without SOT/EOT and without truncation."""
        return self._bpe.encode(_sanitize(text))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Tokenize one caption or a list of them into a LongTensor [B, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        tokens_BL = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)][: self.context_length - 1]
            ids.append(self.eot_token_id)
            tokens_BL[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens_BL

    def decode(self, tokens_L: torch.Tensor | list[int]) -> str:
        """Text of one token row: SOT dropped, cut at the first EOT (padding ignored)."""
        ids = tokens_L.tolist() if isinstance(tokens_L, torch.Tensor) else list(tokens_L)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        ids = [i for i in ids if i != self.sot_token_id]
        return self._bpe.decode(ids).strip()
