"""The tokenizer that serving and training share (``rnnlm.text``), as serving uses it: PTB's
normalization of words and numbers, and a byte stream read in blocks of any size giving the same
tokens as the whole text, multi-byte characters cut by a block boundary included. Expected tokens are
written out by hand."""

from __future__ import annotations

import io

import pytest
from bundles import STREAM_TEXT, TOKENS
from rnnlm.serve import Tokenizer

import rnnlm.text as text_mod
from rnnlm.text import TextSpec
from rnnlm.vocab import Vocabulary

EOS = "<eos>"


PTB_STYLE = TextSpec(lowercase=True, numbers="N")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(PTB_STYLE, Vocabulary(TOKENS))


def texts(tokens: list) -> list[str]:
    return [t.text for t in tokens]


def test_word_normalization_follows_ptb(tok: Tokenizer) -> None:
    assert texts(tok.line_tokens("The STOCK Market")) == ["the", "stock", "market", EOS]
    numbers = tok.line_tokens("1,000 3.5 -2 10:30 1/2 N 1980s <unk> <eos>", eos=False)
    assert texts(numbers) == ["N", "N", "N", "N", "N", "N", "1980s", "<unk>", "<eos>"]
    assert [t.oov for t in numbers] == [False] * 6 + [True, False, False]
    assert numbers[6].id == TOKENS.index("<unk>") and numbers[0].id == TOKENS.index("N")
    assert texts(tok.line_tokens("Zebra-1 a.b")) == ["zebra-1", "a.b", EOS]  # letters: not numbers
    assert texts(tok.text_tokens("the market\n\n   \n\tRose \r\nfell")) == ["the", "market", EOS, EOS, EOS, "rose", EOS,
                                                                         "fell", EOS]
    raw = Tokenizer(PTB_STYLE.raw(), Vocabulary(TOKENS))
    assert [(t.text, t.oov) for t in raw.line_tokens("The 1,000", eos=False)] == [("The", True), ("1,000", True)]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_stream_in_tiny_blocks_equals_text_tokens(tok: Tokenizer, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = STREAM_TEXT.encode("utf-8")
    # Some multi-byte character really is cut by a block boundary.
    starts = [len(STREAM_TEXT[:i].encode()) for i in range(len(STREAM_TEXT))]
    cut = [s for i, s in enumerate(starts) if len(STREAM_TEXT[i].encode()) > 1 and (s // block) != ((s + len(STREAM_TEXT[i].encode()) - 1) // block)]
    assert block == 64 or cut
    monkeypatch.setattr(text_mod, "BLOCK", block)
    streamed = list(tok.stream(io.BytesIO(data), "test"))
    assert streamed == tok.text_tokens(STREAM_TEXT)
    assert texts(streamed)[:7] == ["the", "stock", "market", "fell", "N", "points", EOS]
    assert sum(t.text == EOS for t in streamed) == 7  # blank lines are sentences too


def test_stream_and_text_tokens_agree_on_what_a_line_is(tok: Tokenizer) -> None:
    text = "the stock\x0cmarket\u2028fell\rrose\x85shares\n"
    assert texts(tok.stream(io.BytesIO(text.encode()), "t")) == texts(tok.text_tokens(text))


@pytest.mark.parametrize("tokens,text", [
    (["a", "b", "<eos>", "c"], "a b\nc"),
    (["<eos>", "a"], "\na"),  # a line's first word takes no space before it
    (["a", "<eos>"], "a\n"),  # nor does the newline
    (["a", "<eos>", "<eos>", "b"], "a\n\nb"),
    ([], ""),
])
def test_detokenize_joins_words_as_lines(tok: Tokenizer, tokens: list[str], text: str) -> None:
    """The tokenizer's inverse, the one every generating path uses (``rnnlm generate``, the HTTP
    server, OpenAI completions), piece by piece as they stream it."""
    assert tok.detokenize(tokens) == text
    streamed = ""
    for t in tokens:
        streamed += tok.piece(t, streamed)
    assert streamed == text


def test_detokenize_at_character_level() -> None:
    """Characters as they are, the word boundary a space, and back: the line's own tokens."""
    tok = Tokenizer(TextSpec(level="char"), Vocabulary(TOKENS))
    assert tok.detokenize(["a", "_", "b", "<eos>", "b"]) == "a b\nb"
    assert [t.text for t in tok.line_tokens("a b")] == ["a", "_", "b", "<eos>"]
