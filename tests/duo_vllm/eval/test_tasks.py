"""The tasks: each sample holds its answers where the question points, at the length asked."""

import collections
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.eval.tasks import TASKS, make_sample, task_module
from duo_vllm.eval.tasks.control import INNER


@settings(max_examples=30, deadline=None)
@given(task=st.sampled_from(TASKS), length=st.integers(700, 5000), depth=st.floats(0, 1), index=st.integers(0, 50),
       seed=st.integers(0, 1000))
def test_samples_have_the_length_asked_and_their_answers_in_the_context(builder, task, length, depth, index, seed):
    s = make_sample(builder, task, length, depth, index, seed)
    inner = s.variant or task
    text = builder.decode(s.ids)
    if inner == "commonwords":
        # A list of whole entries, drawn afresh for each size tried (so one entry more can add
        # more than one entry's tokens): within two of its longest entries of the length.
        entries = re.findall(r"^\d+\. .+\n", text, flags=re.MULTILINE)
        longest = max(map(len, builder.encode_many(entries)))
        assert length - 2 * longest <= s.prompt_tokens <= length
    else:
        assert s.prompt_tokens == length
    context = text[:text.rindex(s.question)]
    for answer in s.answers:
        assert answer in context
    assert s.max_tokens == task_module(inner).MAX_TOKENS <= task_module(task).MAX_TOKENS
    again = make_sample(builder, task, length, depth, index, seed)
    assert again.ids == s.ids and again.answers == s.answers


def test_needle_depth_follows_the_grid(builder):
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = make_sample(builder, "needle", 3000, depth, 0, 0)
        assert s.depth == depth
        assert depth - 1e-6 <= s.needle_depths[0] <= depth + 0.05


def test_multikey_asks_for_one_key_among_distractors(builder):
    s = make_sample(builder, "multikey", 2000, None, 0, 0)
    text = builder.decode(s.ids)
    assert text.count("One of the special magic numbers for") == 4
    assert len(s.answers) == 1 and len(s.needle_depths) == 4


def test_vartrack_chain_is_in_text_order_and_a_distractor_chain_is_not_the_answer(builder):
    s = make_sample(builder, "vartrack", 3000, None, 3, 0)
    text = builder.decode(s.ids)
    positions = [text.index(f"VAR {name} =") for name in s.answers]
    assert positions == sorted(positions)
    assigned = re.findall(r"VAR ([A-Z]{5}) =", text)
    assert len(assigned) == 10 and set(s.answers) < set(assigned)


def test_common_words_are_the_most_frequent(builder):
    for length in (700, 4000):
        s = make_sample(builder, "commonwords", length, None, 0, 0)
        text = builder.decode(s.ids)
        listed = re.findall(r"^\d+\. (\w+)$", text, flags=re.MULTILINE)
        counts = collections.Counter(listed)
        least_common = min(counts[w] for w in s.answers)
        most_other = max(c for w, c in counts.items() if w not in s.answers)
        assert least_common > most_other


def test_control_cycles_through_the_other_tasks(builder):
    variants = [make_sample(builder, "control", 1536, None, k, 0).variant for k in range(len(INNER))]
    assert variants == list(INNER)


def test_unknown_task(builder):
    with pytest.raises(ValueError, match="unknown task 'haystack'"):
        make_sample(builder, "haystack", 1000, None, 0, 0)
