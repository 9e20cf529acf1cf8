"""Tests of duo_vllm.testing.haystack: natural-text token windows for long-context tests."""

from __future__ import annotations

import re

import pytest

from duo_vllm.testing.haystack import CANTERBURY_FILES, fetch_corpus, haystack_text, haystack_tokens


def test_corpus_is_fetched_and_cached():
    folder = fetch_corpus()
    for name in CANTERBURY_FILES:
        assert (folder / name).stat().st_size > 100_000
    assert fetch_corpus() == folder


def test_text_is_whitespace_normalised_prose():
    text = haystack_text()
    assert len(text) > 1_000_000
    assert "Alice" in text and "  " not in text
    assert all(p == " ".join(p.split()) for p in text.split("\n\n")[:200])


@pytest.mark.parametrize("n", [1, 17, 1000, 8000])
def test_exact_token_count(smollm2_tokenizer, n):
    tokens = haystack_tokens(smollm2_tokenizer, n)
    assert len(tokens) == n
    assert all(isinstance(t, int) and 0 <= t < len(smollm2_tokenizer) for t in tokens)


@pytest.mark.parametrize("n", [1000, 8000])
def test_decoded_text_is_natural_english(smollm2_tokenizer, n):
    text = smollm2_tokenizer.decode(haystack_tokens(smollm2_tokenizer, n, offset=500))
    letters_spaces = sum(c.isalpha() or c.isspace() for c in text)
    assert letters_spaces / len(text) > 0.9, text[:300]
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) > n * 0.5
    for common in ("the", "and", "of"):
        assert words.count(common) > n / 200, common
    assert " the " in text
    # Not repetitive filler: vocabulary grows with length as in real prose (Heaps' law).
    assert len(set(words)) > 5 * len(words) ** 0.5


@pytest.mark.parametrize("offset,n", [(0, 10), (1, 50), (123, 1000), (20_000, 300)])
def test_offset_slides_the_window(smollm2_tokenizer, offset, n):
    longer = haystack_tokens(smollm2_tokenizer, offset + n + 7)
    assert haystack_tokens(smollm2_tokenizer, n, offset=offset) == longer[offset:offset + n]


def test_zero_tokens_is_empty(smollm2_tokenizer):
    assert haystack_tokens(smollm2_tokenizer, 0) == []


def test_too_many_tokens_raises_clearly(smollm2_tokenizer):
    with pytest.raises(ValueError, match=r"haystack has (\d+) tokens .*asked for 10000000") as info:
        haystack_tokens(smollm2_tokenizer, 10_000_000)
    total = int(re.search(r"has (\d+) tokens", str(info.value)).group(1))
    assert 100_000 < total < 10_000_000
    # The whole corpus is fine; one more token past the end is not.
    assert len(haystack_tokens(smollm2_tokenizer, total)) == total
    assert len(haystack_tokens(smollm2_tokenizer, 1, offset=total - 1)) == 1
    with pytest.raises(ValueError, match="smaller offset"):
        haystack_tokens(smollm2_tokenizer, 1, offset=total)


@pytest.mark.parametrize("n,offset", [(-1, 0), (5, -1)])
def test_negative_arguments_raise(smollm2_tokenizer, n, offset):
    with pytest.raises(ValueError, match=">= 0"):
        haystack_tokens(smollm2_tokenizer, n, offset=offset)
