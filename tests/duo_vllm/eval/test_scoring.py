import pytest

from duo_vllm.eval.scoring import found, score


def test_whole_word_case_insensitive():
    assert found("1234567", "The number is 1234567.")
    assert not found("1234567", "The number is 91234567.")
    assert found("garden", "GARDEN, then")
    assert not found("ABCDE", "ABCDEF")


def test_share_of_answers_found():
    assert score(["11", "22", "33", "44"], "11 and 33") == 50.0
    assert score(["x"], "") == 0.0
    assert score(["a.b"], "it is a.b") == 100.0 and score(["a.b"], "it is axb") == 0.0
    with pytest.raises(ValueError):
        score([], "anything")
