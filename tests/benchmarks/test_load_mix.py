"""The load test's request mix (benchmarks/_load_mix.py): seeded, and every round of the bag holds
each kind exactly as often as its weight."""

from __future__ import annotations

from collections import Counter

from _load_mix import KINDS, Workload


def test_every_round_holds_the_whole_mix_and_seeds_reproduce(smollm2_tokenizer):
    rounds = 3
    size = sum(KINDS.values())
    work = Workload(smollm2_tokenizer, max_model_len=512, seed=5)
    drawn = [work.next() for _ in range(rounds * size)]
    for i in range(rounds):
        assert Counter(kind for kind, _ in drawn[i * size:(i + 1) * size]) == KINDS
    assert [kind for kind, _ in drawn[:size]] != [kind for kind, _ in drawn[size:2 * size]]  # reshuffled
    again = Workload(smollm2_tokenizer, max_model_len=512, seed=5)
    assert [again.next() for _ in range(rounds * size)] == drawn
    other = Workload(smollm2_tokenizer, max_model_len=512, seed=6)
    assert [other.next()[0] for _ in range(size)] != [kind for kind, _ in drawn[:size]]
    for kind, spec in drawn:
        if kind == "long":
            assert len(spec["prompt"]) == 512 - 24 - 8
        assert kind != "probe" or set(spec) == {"probe"}
