"""Prompt emphasis grammar, 75-token chunking and weighted encoding (A1111 conventions)."""

from __future__ import annotations

import pytest
import torch

from stablediff.prompts import (
    BREAK,
    COMMA_BACKTRACK,
    apply_weights,
    encode_chunks,
    pad_chunks,
    parse_prompt,
    tokenize_prompt,
)
from stablediff.tokenizer import CLIPTokenizer

CAT, DOG, COMMA = 2368, 1929, 267  # "cat", "dog", "," in the CLIP vocabulary


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def tok_sd2():
    return CLIPTokenizer.default(pad_token="!")  # SD2.x pads with "!" (id 0)


# Golden cases; the weights of the long case are A1111's own doctest values, to the last bit.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("", [("", 1.0)]),
        ("(a)", [("a", 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
        ("(a:1.5)", [("a", 1.5)]),
        ("( a : 0.5 )", [(" a ", 0.5)]),
        ("(a:-1)", [("a", -1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((a:1.2) b)", [("a", 1.2 * 1.1), (" b", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped, as in A1111
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a) b] c", [("a) b] c", 1.0)]),  # closers without openers are text
        ("a: 1.5) b", [("a: 1.5) b", 1.0)]),
        ("(a:.)", [("a:.)", 1.1)]),  # A1111 raises on float("."); we keep it as text
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a BREAKING break", [("a BREAKING break", 1.0)]),  # uppercase whole word only
        ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # BREAK keeps its meaning inside brackets
    ],
)
def test_parse_prompt(text, expected):
    assert parse_prompt(text) == expected


def test_plain_short_prompts_equal_the_tokenizer(tok, tok_sd2):
    prompts = [
        "",
        "a cat",
        "a photograph of an astronaut riding a horse, highly detailed, 8k",
        "A Cat: sitting! on; the mat?",
        "emoji 🐱 and ünïcödé",
        "cat " * 75,
    ]
    for tokenizer in (tok, tok_sd2):
        for text in prompts:
            chunks = tokenize_prompt(tokenizer, text)
            assert len(chunks) == 1, text
            assert list(chunks[0].ids) == tokenizer(text), text
            assert chunks[0].weights == (1.0,) * 77 and chunks[0].plain


def test_sd2_padding(tok_sd2):
    ids = tokenize_prompt(tok_sd2, "a cat")[0].ids
    assert ids[:4] == (49406, 320, CAT, 49407) and set(ids[4:]) == {0}


def test_weights_follow_tokens(tok):
    chunk = tokenize_prompt(tok, "a (cat:1.5) [dog]")[0]
    assert chunk.ids[:5] == (49406, 320, CAT, DOG, 49407)
    assert chunk.weights[:5] == (1.0, 1.0, 1.5, 1 / 1.1, 1.0) and not chunk.plain
    assert chunk.n_tokens == 3 and chunk.weights[5:] == (1.0,) * 72


def test_long_prompt_gives_three_chunks(tok):
    chunks = tokenize_prompt(tok, "cat " * 200)
    assert [c.n_tokens for c in chunks] == [75, 75, 50]
    for c in chunks:
        assert len(c.ids) == len(c.weights) == 77 and c.ids[0] == tok.bos_id
        assert c.ids[c.n_tokens + 1] == tok.eos_id
    assert chunks[2].ids[52:] == (tok.pad_id,) * 25


def test_comma_backtrack_moves_the_last_phrase(tok):
    # 65 cats, a comma at index 65, then 20 dogs: the chunk fills after 9 dogs; the comma is 10 <= 20
    # tokens back, so those 9 dogs move to the next chunk with the rest.
    chunks = tokenize_prompt(tok, "cat " * 65 + ", " + "dog " * 20)
    assert [c.n_tokens for c in chunks] == [66, 20]
    assert chunks[0].ids[1:68] == (CAT,) * 65 + (COMMA, tok.eos_id)
    assert chunks[1].ids[1:21] == (DOG,) * 20
    # The same text without the rule: a hard cut at 75 tokens.
    assert [c.n_tokens for c in tokenize_prompt(tok, "cat " * 65 + ", " + "dog " * 20, comma_backtrack=0)] == [75, 11]


def test_comma_too_far_back_is_ignored(tok):
    assert COMMA_BACKTRACK == 20
    chunks = tokenize_prompt(tok, "cat " * 50 + ", " + "dog " * 40)  # comma 25 tokens from the end
    assert [c.n_tokens for c in chunks] == [75, 16]


def test_backtrack_keeps_weights(tok):
    # 64 cats then ", big dog" x4 (commas at 64, 67, 70, 73): the chunk is full after "big", so
    # "big" moves on with its weight, joined by "dog" and the de-emphasised "cat".
    chunks = tokenize_prompt(tok, "cat " * 64 + ", (big dog:1.3)" * 4 + " [cat]")
    assert [c.n_tokens for c in chunks] == [74, 3]
    assert chunks[0].ids[74:76] == (COMMA, tok.eos_id) and chunks[0].weights[72:76] == (1.3, 1.3, 1.0, 1.0)
    assert chunks[1].ids[2:4] == (DOG, CAT) and chunks[1].weights[:5] == (1.0, 1.3, 1.3, 1 / 1.1, 1.0)


def test_break(tok):
    assert [c.n_tokens for c in tokenize_prompt(tok, "a cat BREAK a dog")] == [2, 2]
    assert [c.n_tokens for c in tokenize_prompt(tok, "BREAK a dog")] == [0, 2]  # A1111: an empty first chunk
    assert [c.n_tokens for c in tokenize_prompt(tok, "a dog BREAK")] == [2]
    assert [c.n_tokens for c in tokenize_prompt(tok, "a BREAK BREAK b")] == [1, 0, 1]
    assert [c.n_tokens for c in tokenize_prompt(tok, "cat " * 80 + "BREAK dog")] == [75, 5, 1]


def test_empty_prompt_is_one_chunk(tok):
    (chunk,) = tokenize_prompt(tok, "")
    assert list(chunk.ids) == tok("") and chunk.plain


def test_pad_chunks(tok, tok_sd2):
    for tokenizer in (tok, tok_sd2):
        long, short = tokenize_prompt(tokenizer, "cat " * 200), tokenize_prompt(tokenizer, "ugly")
        a, b = pad_chunks(long, short)
        assert len(a) == len(b) == 3 and a == long and b[0] == short[0]
        assert list(b[1].ids) == list(b[2].ids) == tokenizer("") and b[1].plain
        b2, a2 = pad_chunks(short, long)
        assert b2 == b and a2 == a


class FakeEncoder:
    """A deterministic stand-in for the text encoder: an embedding table plus a token mixing step."""

    def __init__(self, dim: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.table = torch.randn(49408, dim, generator=gen) + 0.3  # non-zero mean, like real outputs
        self.calls = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.clone())
        z = self.table[ids]
        return z + 0.1 * z.cumsum(dim=1)


def test_encode_is_identity_for_plain_prompts(tok):
    enc = FakeEncoder()
    for text in ["a cat", "", "a photo of a dog, 8k"]:
        ref = enc(torch.tensor([tok(text)]))
        out = encode_chunks(enc, tokenize_prompt(tok, text), "cpu")
        assert out.shape == (1, 77, 8) and torch.equal(out, ref)
    assert enc.calls[-1].dtype == torch.long and enc.calls[-1].shape == (1, 77)


def test_encode_long_prompt_concatenates(tok):
    enc = FakeEncoder()
    chunks = tokenize_prompt(tok, "cat " * 200)
    out = encode_chunks(enc, chunks)
    assert out.shape == (1, 231, 8)
    for i, c in enumerate(chunks):
        assert torch.equal(out[:, 77 * i : 77 * (i + 1)], enc(torch.tensor([c.ids])))


def test_weighted_encoding_restores_the_mean(tok):
    enc = FakeEncoder()
    (chunk,) = tokenize_prompt(tok, "a (cat:1.5) [dog] (bird:0.2)")
    z = enc(torch.tensor([chunk.ids]))
    out = encode_chunks(enc, [chunk])
    w = torch.tensor(chunk.weights).reshape(1, 77, 1)
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mean(), z.mean(), rtol=1e-5, atol=1e-6)
    # Unweighted tokens are scaled by one common factor; the weighted ones by w times it.
    factor = out[0, 0, 0] / z[0, 0, 0]
    torch.testing.assert_close(out[0, 2] / z[0, 2], torch.full((8,), 1.5) * factor)


def test_apply_weights_half_precision_and_zero_mean():
    z = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1)).half() + 0.5
    out = apply_weights(z, [1.2] * 40 + [1.0] * 37)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert abs(out.float().mean() - z.float().mean()) < 1e-2
    zero = torch.zeros(1, 77, 4)
    assert torch.equal(apply_weights(zero, [2.0] * 77), zero)  # no division by a zero mean


def test_encoder_output_is_checked(tok):
    with pytest.raises(ValueError, match=r"must return a \[1, 77, D\] tensor; chunk 0 gave \[1, 76, 4\]"):
        encode_chunks(lambda ids: torch.zeros(1, 76, 4), tokenize_prompt(tok, "a"))
    with pytest.raises(ValueError, match="at least one chunk"):
        encode_chunks(FakeEncoder(), [])
