"""Tokenizer: agreement with open_clip.tokenize, round trips, truncation, odd unicode."""

import pickle

import open_clip
import pytest
import torch

from aclip.tokenizer import Tokenizer

CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "Two dogs playing in the snow.",
    "an aerial view of the city at night, 2019",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(context_length=77)


def test_special_ids_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49408
    assert tok.sot_token_id == 49406
    assert tok.eot_token_id == 49407


def test_matches_open_clip_tokenize(tok: Tokenizer) -> None:
    ours = tok(CAPTIONS)
    ref = open_clip.tokenize(CAPTIONS, context_length=77)
    assert ours.dtype == torch.long
    assert ours.shape == (len(CAPTIONS), 77)
    assert torch.equal(ours, ref)


def test_single_string_and_layout(tok: Tokenizer) -> None:
    out = tok("a cat")
    assert out.shape == (1, 77)
    row = out[0].tolist()
    assert row[0] == 49406
    eot_pos = row.index(49407)
    assert eot_pos == 3  # SOT, "a", "cat", EOT
    assert all(v == 0 for v in row[eot_pos + 1 :])
    assert int(out[0].argmax()) == eot_pos


def test_round_trip(tok: Tokenizer) -> None:
    # CLIP BPE is lossy around punctuation ("snow." decodes as "snow ."), so the exact text
    # round trip is checked on plain words and the token round trip on every caption.
    for caption in ["a photo of a cat sitting on a red sofa", "the quick brown fox jumps"]:
        assert tok.decode(tok(caption)[0]) == caption
    for caption in CAPTIONS:
        tokens = tok(caption)
        assert torch.equal(tok(tok.decode(tokens[0])), tokens)
    assert tok.decode(tok("Two dogs playing in the snow.")[0]) == "two dogs playing in the snow ."
    assert tok.decode(tok("A  Dog\n\tRuns")[0]) == "a dog runs"


def test_truncation_keeps_eot_last() -> None:
    tok = Tokenizer(context_length=16)
    long_caption = " ".join(["word"] * 200)
    out = tok(long_caption)
    assert out.shape == (1, 16)
    assert out[0, 0] == 49406
    assert out[0, -1] == 49407
    assert (out[0, 1:-1] != 0).all()
    assert torch.equal(out, open_clip.tokenize(long_caption, context_length=16))


@pytest.mark.parametrize(
    "caption",
    [
        "cafÃ© au lait",  # mojibake
        "zero\u200bwidth\u200djoin\ufeff",
        "emoji 🐱🐶👩‍👩‍👧 ok",
        "lone surrogate \ud800 here",
        "&amp;lt;b&amp;gt;html&amp;lt;/b&amp;gt;",
        "",
        "   \n\t  ",
        "日本語のキャプション",
        "\x00\x01 control",
    ],
)
def test_odd_unicode_does_not_crash(tok: Tokenizer, caption: str) -> None:
    out = tok(caption)
    assert out.shape == (1, 77)
    row = out[0].tolist()
    assert row[0] == 49406 and 49407 in row
    assert isinstance(tok.decode(out[0]), str)


def test_mojibake_is_fixed(tok: Tokenizer) -> None:
    assert torch.equal(tok("cafÃ© au lait"), tok("café au lait"))


def test_non_str_values(tok: Tokenizer) -> None:
    out = tok([None, b"bytes caption", "x"])  # type: ignore[list-item]
    assert out.shape == (3, 77)
    assert out[0, :2].tolist() == [49406, 49407]
    assert tok.decode(out[1]) == "bytes caption"


def test_picklable_for_workers(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(CAPTIONS), tok(CAPTIONS))


def _fuzz_captions(seed: int, n: int, most: int) -> list[str]:
    """Captions near the BPE bound: long letter words, emoji runs (a vocabulary entry covers
    up to 8 emoji = 32 byte symbols), CJK, digits, punctuation runs, mojibake, many words;
    ``most`` scales the longest runs."""
    import random

    rng = random.Random(seed)

    def k(top: int) -> int:
        return rng.randint(1, max(1, top * most // 400))

    parts = [
        lambda: "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=k(400))),
        lambda: "😂" * k(120),
        lambda: "👩‍👩‍👧" * k(30),
        lambda: "日本語の" * k(40),
        lambda: str(rng.randint(0, 10**12)),
        lambda: "!?.," * k(60),
        lambda: "cafÃ© naïve Ελληνικά",
        lambda: " ".join(rng.choices(["a", "photo", "of", "the", "red"], k=k(90))),
    ]
    return [" ".join(rng.choice(parts)() for _ in range(rng.randint(1, 4))) for _ in range(n)]


@pytest.mark.parametrize("context_length", [77, 8])
def test_bounded_bpe_gives_open_clips_tokens(context_length: int) -> None:
    """Every caption that fits the context gets exactly open_clip's tokens; a caption that does
    not is still truncated (a full row ending in EOT), and when it has no piece longer than the
    cut (n * 32 + 1 symbols) its tokens are open_clip's too."""
    tok = Tokenizer(context_length)
    n = context_length - 2
    captions = (
        CAPTIONS
        + [
            "😂" * 599,  # 2396 symbols, exactly 75 ids: fits the 77 context at the bound
            "😂" * 600,  # 76 ids
            "a " * 75,
            "a " * 76,
            "word" * 300,
            "x" * (n * 32) + " tail",
            "x" * (n * 32 + 1),
            "x" * (n * 32 + 2) + " tail",
        ]
        + _fuzz_captions(0, 300, most=400)
        + _fuzz_captions(1, 200, most=20)
    )
    fits = cut = 0
    for caption in captions:
        ref = open_clip.tokenize([caption], context_length=context_length)
        full = tok.encode(caption)
        ours = tok(caption)
        if len(full) <= n:
            fits += 1
            assert torch.equal(ours, ref), caption[:60]
        else:
            row = ours[0].tolist()  # truncated: EOT last, nowhere before (no padding)
            assert row.index(tok.eot_token_id) == context_length - 1, caption[:60]
            pieces = tok._bpe.pat.findall(tok._bpe.clean_fn(caption))
            if max(len(p.encode()) for p in pieces) <= n * 32 + 1:
                assert torch.equal(ours, ref), caption[:60]
            else:
                cut += 1
    assert fits > 30 and cut >= 1  # both sides of the bound were exercised


def test_bpe_work_is_bounded_on_huge_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MB caption and a 10,000-letter word reach the BPE only as far as the first 75 ids
    need: under 2 * 75 * M + 2 byte symbols in all (M = 32, the longest vocabulary entry), a
    single word at most 75 * M + 1 (the BPE's cost grows faster than linearly in a word)."""
    import random

    tok = Tokenizer(77)
    longest = max(len(entry.removesuffix("</w>")) for entry in tok._bpe.encoder)
    assert longest == 32
    n = 75
    seen: list[int] = []
    bpe = tok._bpe.bpe
    monkeypatch.setattr(tok._bpe, "bpe", lambda word: seen.append(len(word)) or bpe(word))
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(20_000)]
    huge = {
        "1 MB of words": ((" ".join(words) + " ") * 10)[:1_000_000],
        "10,000-letter word": "".join(rng.choices(letters, k=10_000)),
        "1 MB word": "ab" * 500_000,
        "1 MB of emoji": "😂" * 250_000,
    }
    for name, caption in huge.items():
        seen.clear()
        row = tok(caption)[0].tolist()
        assert row.index(tok.eot_token_id) == 76, name  # truncated, EOT last
        assert sum(seen) < 2 * n * longest + 2, (name, sum(seen))
        assert max(seen) <= n * longest + 1, (name, max(seen))
