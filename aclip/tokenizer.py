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


def longest_token_symbols(encoder: dict[str, int]) -> int:
    """The most byte symbols one vocabulary entry stands for (its text without the ``</w>``
    end-of-word marker): 32 for CLIP's vocabulary."""
    return max(len(entry.removesuffix("</w>")) for entry in encoder)


class Tokenizer:
    """SOT + BPE + EOT ids, zero padded to ``context_length``.

    Cleaning (ftfy, HTML unescape, whitespace normalisation, lower case) is open_clip's
    ``SimpleTokenizer.encode``; values it could not encode (lone surrogates, bytes, None) are
    sanitised first, so an odd caption never crashes a run. Too-long captions are truncated
    with the EOT id kept as the last token (the text tower pools at the EOT position), and
    the BPE never sees more of a caption than its first ``context_length - 2`` ids need (see
    :meth:`encode`), so a huge caption costs a bounded amount of BPE work.
    """

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (got {context_length})")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size: int = self._bpe.vocab_size
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id
        self.longest_token: int = longest_token_symbols(self._bpe.encoder)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of one caption, without SOT/EOT; all of them when ``max_tokens`` is None.

        With ``max_tokens`` = n the BPE work is bounded, and the ids are open_clip's for every
        caption of at most n ids (one that fits the context). The argument, on open_clip's
        ``SimpleTokenizer.encode``: the cleaned text is split by its regex into pieces, each
        piece's UTF-8 bytes become symbols, and the ids are the concatenation of each piece's
        BPE ids.

        1. Every piece gives at least one id (BPE merges symbols, it never drops one), so once
           n ids are made the later pieces cannot change the first n: they are not read.
        2. Every id stands for one vocabulary entry, which covers at most M symbols of its
           piece (M = ``longest_token``, 32 for CLIP), and a piece's ids cover it without
           overlap: a piece of c symbols gives at least ceil(c / M) ids. A piece of more than
           n * M symbols therefore gives more than n ids alone, whatever its later symbols
           are, so it is cut to n * M + 1 symbols: it still gives more than n ids (the
           caption is truncated either way), and no piece of a caption of at most n ids is
           ever that long. Only a truncated caption can see other ids, and only from its cut
           piece on (BPE merges are not prefix-stable).

        Hence at most (n - 1) * M symbols in the pieces before the last one read (they give
        fewer than n ids) plus n * M + 1 in the last: fewer than 2 * n * M + 2 symbols reach
        the BPE, whatever the caption's length (ftfy's cleaning still reads the whole text once:
        ~0.05 s for 1 MB of words, ~0.5 s for 1 MB of mojibake).
        """
        if max_tokens is None:
            return self._bpe.encode(_sanitize(text))
        bpe, ids = self._bpe, []
        longest_piece = max_tokens * self.longest_token + 1
        for match in bpe.pat.finditer(bpe.clean_fn(_sanitize(text))):
            if len(ids) >= max_tokens:
                break
            piece = "".join(bpe.byte_encoder[b] for b in match.group().encode("utf-8"))
            ids.extend(bpe.encoder[t] for t in bpe.bpe(piece[:longest_piece]).split(" "))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Tokenize one caption or a list of them into a LongTensor [B, context_length]."""
        if isinstance(texts, str):
            texts = [texts]
        tokens_BL = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            kept = self.context_length - 2  # the BPE ids between SOT and EOT
            ids = [self.sot_token_id, *self.encode(text, max_tokens=kept)][: kept + 1]
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
