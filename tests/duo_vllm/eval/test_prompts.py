"""Prompt assembly: exact lengths, needles where the task says, seeds that reproduce (property
tests over the real SmolLM2 tokenizer and corpus)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.eval.prompts import PromptBuilder, PromptError

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(length=st.integers(200, 6000), depth=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_needle_lands_at_its_depth_in_a_prompt_of_the_exact_length(builder, length, depth, seed):
    sentence = "One of the special magic numbers for test-key is: 1234567."
    prompt = builder.with_needles(length, [sentence], [depth], "Q?", "A:", random.Random(seed))
    assert len(prompt.ids) == length
    needle_ids = builder.encode(" " + sentence)
    start = prompt.needle_starts[0]
    assert prompt.ids[start:start + len(needle_ids)] == needle_ids
    # the prose before it: its depth, moved forward only to the next sentence end (the snap window)
    prose = prompt.context_end - prompt.context_start - len(needle_ids)
    before = start - prompt.context_start
    assert round(depth * prose) <= before <= round(depth * prose) + 96
    assert prompt.needle_depth(0) == before / prose
    assert prompt.context_start <= start <= prompt.context_end - len(needle_ids)


@SETTINGS
@given(length=st.integers(300, 4000), seed=st.integers(0, 2**31),
       depths=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_every_needle_is_in_the_prompt_once_at_its_own_place(builder, length, seed, depths):
    sentences = [f"Needle number {k} says {k * 1111111}." for k in range(len(depths))]
    prompt = builder.with_needles(length, sentences, depths, "Q?", "A:", random.Random(seed))
    assert len(prompt.ids) == length
    for k, sentence in enumerate(sentences):
        ids = builder.encode(" " + sentence)
        assert prompt.ids[prompt.needle_starts[k]:prompt.needle_starts[k] + len(ids)] == ids
        assert builder.decode(prompt.ids).count(sentence) == 1
    # needles keep the order of their depths
    order = sorted(range(len(depths)), key=lambda k: (depths[k], k))
    starts = [prompt.needle_starts[k] for k in order]
    assert starts == sorted(starts)


def test_same_seed_same_prompt_other_seed_other_text(builder):
    make = lambda seed: builder.with_needles(2048, ["x is 5."], [0.5], "Q?", "A:", random.Random(seed)).ids
    assert make(3) == make(3)
    assert make(3) != make(4)


def test_context_longer_than_the_corpus_wraps_round(smollm2_tokenizer):
    builder = PromptBuilder(smollm2_tokenizer)
    n = len(builder._corpus) + 5000
    hay = builder.haystack(n, random.Random(0))
    assert len(hay) == n


def test_chat_frame_wraps_the_context_and_ends_with_the_answer_prefix(builder, smollm2_tokenizer):
    prompt = builder.with_needles(600, ["x is 5."], [0.5], "What is x?", "x is", random.Random(0))
    text = smollm2_tokenizer.decode(prompt.ids)
    assert text.startswith("<|im_start|>system")
    assert text.endswith("What is x?<|im_end|>\n<|im_start|>assistant\nx is")


def test_plain_frame_without_chat_template(smollm2_tokenizer):
    builder = PromptBuilder(smollm2_tokenizer, chat=False)
    prompt = builder.with_needles(600, ["x is 5."], [0.5], "What is x?", "x is", random.Random(0))
    text = smollm2_tokenizer.decode(prompt.ids)
    assert "<|im_start|>" not in text and text.endswith("\n\nWhat is x?\n\nx is")


def test_prompt_too_short_for_its_needles_is_refused(builder):
    with pytest.raises(PromptError, match="use a longer length"):
        builder.with_needles(40, ["a long needle sentence " * 10], [0.5], "Q?", "A:", random.Random(0))
    with pytest.raises(PromptError, match="depths in \\[0, 1\\]"):
        builder.with_needles(400, ["x"], [1.5], "Q?", "A:", random.Random(0))
