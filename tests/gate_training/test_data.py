"""The passkey data builder: reproducible by seed, cached, and answers where the passkeys are."""

from __future__ import annotations

import pytest

from gate_training.config import GateTrainingError
from gate_training.data import (
    ANSWER_ITEM,
    NEEDLE_TEMPLATE,
    QUESTION,
    PasskeySpec,
    build_passkey_dataset,
    eval_sample,
    eval_samples,
    make_sample,
)

SPEC = PasskeySpec(num_samples=8, min_context=200, max_context=600, num_lengths=4,
                   num_passkeys=3, passkey_length=6, seed=5)
COLUMNS = {"input_ids", "answer_start", "context_length", "depths", "passkeys",
           "passkey_positions", "sample_index"}


@pytest.fixture(scope="module")
def dataset(smollm2_tokenizer, tmp_path_factory):
    return build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path_factory.mktemp("data"))


def test_columns_and_lengths(dataset):
    assert set(dataset.column_names) == COLUMNS
    assert len(dataset) == SPEC.num_samples
    edges = SPEC.length_edges()
    intervals = sorted(
        next(k for k in range(SPEC.num_lengths) if edges[k] <= n <= edges[k + 1])
        for n in dataset["context_length"]
    )
    # two samples per interval: lengths are spread over the whole range
    assert intervals == [0, 0, 1, 1, 2, 2, 3, 3]


def test_same_seed_same_data_other_seed_other_data(dataset, smollm2_tokenizer, tmp_path):
    again = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path / "a")
    assert again.to_list() == dataset.to_list()
    other = build_passkey_dataset(
        smollm2_tokenizer, PasskeySpec(**{**SPEC.__dict__, "seed": 6}), tmp_path / "b"
    )
    assert other["input_ids"] != dataset["input_ids"]
    assert other["passkeys"] != dataset["passkeys"]


def test_cached_on_disk(smollm2_tokenizer, tmp_path):
    first = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path)
    folders = list(tmp_path.glob("passkeys-*"))
    assert len(folders) == 1 and (folders[0] / "dataset_info.json").is_file()
    second = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path)
    assert second.cache_files and second.cache_files[0]["filename"].startswith(str(folders[0]))
    assert second.to_list() == first.to_list()


def test_built_without_hashing_the_table(smollm2_tokenizer, tmp_path, monkeypatch):
    """datasets' own fingerprint (a dill hash of the table state) breaks on some Python/pyarrow
    pairs; the content key is the fingerprint instead, with or without the disk cache."""
    import datasets.arrow_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("datasets hashed the table: pass the content key as fingerprint")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    first = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path)
    again = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path)  # loaded from the cache
    plain = build_passkey_dataset(smollm2_tokenizer, SPEC)
    assert first.to_list() == again.to_list() == plain.to_list()


def test_answers_are_the_inserted_passkeys(dataset, smollm2_tokenizer):
    tok = smollm2_tokenizer
    question = tok.encode(QUESTION, add_special_tokens=False)
    for row in dataset:
        ids = row["input_ids"]
        n = row["context_length"]
        assert ids[n:row["answer_start"]] == question
        assert len(row["passkeys"]) == SPEC.num_passkeys
        assert row["depths"] == sorted(row["depths"]) and all(0 <= d <= 1 for d in row["depths"])
        assert row["passkey_positions"] == sorted(row["passkey_positions"])
        for number, (pos, words) in enumerate(zip(row["passkey_positions"], row["passkeys"]), start=1):
            assert len(words.split()) == SPEC.passkey_length
            needle = tok.encode(NEEDLE_TEMPLATE.format(number=number, words=words), add_special_tokens=False)
            assert ids[pos:pos + len(needle)] == needle, f"passkey {number} not at {pos}"
            assert pos + len(needle) <= n
        answer = "".join(ANSWER_ITEM.format(number=i + 1, words=w) for i, w in enumerate(row["passkeys"]))
        assert tok.decode(ids[row["answer_start"]:]) == answer


def test_eval_sample_is_held_out(dataset, smollm2_tokenizer):
    sample = eval_sample(smollm2_tokenizer, SPEC)
    assert sample["context_length"] == SPEC.max_context
    assert sample["passkeys"] not in dataset["passkeys"]
    assert make_sample(smollm2_tokenizer, SPEC, 3) == make_sample(smollm2_tokenizer, SPEC, 3)
    several = eval_samples(smollm2_tokenizer, SPEC, 3)
    assert [s["context_length"] for s in several] == [200, 400, 600]
    assert not any(s["passkeys"] in dataset["passkeys"] for s in several)


def test_passkeys_that_do_not_fit_are_refused(smollm2_tokenizer):
    spec = PasskeySpec(num_samples=1, min_context=100, max_context=100, num_passkeys=10, passkey_length=32)
    with pytest.raises(GateTrainingError, match="lower --num-passkeys"):
        make_sample(smollm2_tokenizer, spec, 0)
