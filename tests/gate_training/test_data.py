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


# ---------------------------------------------------------------- the user's own haystack

def _own_text(words: int = 3000, seed: int = 0) -> str:
    """Sentences of pseudo-words (a text no tokenizer has seen as prose), in paragraphs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(4, 9))) for _ in range(400)]
    sentences = [" ".join(rng.choice(vocab, size=12)).capitalize() + "." for _ in range(words // 12)]
    return "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))


@pytest.fixture(scope="module")
def own_haystack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own-haystack")
    (folder / "b.txt").write_text(_own_text(seed=2))
    (folder / "a.txt").write_text(_own_text(seed=1))
    (folder / "notes.md").write_text("not read: only .txt files are")
    return folder


def test_own_haystack_file_and_folder(own_haystack, smollm2_tokenizer, tmp_path):
    from gate_training.data import describe_haystack, load_haystack

    text = load_haystack(own_haystack)
    # files in name order, paragraphs kept, other extensions ignored
    assert text.startswith(_own_text(seed=1).split("\n\n")[0]) and "not read" not in text
    assert text.index(_own_text(seed=2)[:80]) > text.index(_own_text(seed=1)[:80])
    spec = PasskeySpec(**{**SPEC.__dict__, "haystack": str(own_haystack)})
    sample = make_sample(smollm2_tokenizer, spec, 0)
    haystack_ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    first_needle = sample["passkey_positions"][0]
    # the context before the first passkey is a contiguous stretch of this text
    head = sample["input_ids"][:first_needle]
    assert len(head) > 0 and any(haystack_ids[i:i + len(head)] == head for i in range(len(haystack_ids) - len(head) + 1))
    assert all(w in text for key in sample["passkeys"] for w in key.split())  # passkey words from it too
    assert make_sample(smollm2_tokenizer, spec, 0) == sample
    single = tmp_path / "one.txt"
    code = "def f(x):\r\n    return x  # indentation and line breaks kept\r\n"
    single.write_bytes((_own_text(seed=1) + "\r\n\r\n" + code).encode())
    assert load_haystack(single) == _own_text(seed=1) + "\n\n" + code.replace("\r\n", "\n").rstrip("\n")
    info = describe_haystack(own_haystack, smollm2_tokenizer)
    assert info["source"] == str(own_haystack.resolve()) and info["tokens"] == len(haystack_ids)
    assert describe_haystack(None)["source"].startswith("Canterbury corpus")


def test_dataset_key_follows_the_haystack_content_not_its_path(own_haystack, smollm2_tokenizer, tmp_path):
    import shutil

    spec = PasskeySpec(**{**SPEC.__dict__, "haystack": str(own_haystack)})
    own = build_passkey_dataset(smollm2_tokenizer, spec, tmp_path / "cache")
    copy = tmp_path / "copy"
    shutil.copytree(own_haystack, copy)
    moved = build_passkey_dataset(smollm2_tokenizer, PasskeySpec(**{**spec.__dict__, "haystack": str(copy)}),
                                  tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("passkeys-*"))) == 1  # same content: reused
    assert moved.to_list() == own.to_list()
    default = build_passkey_dataset(smollm2_tokenizer, SPEC, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("passkeys-*"))) == 2
    assert default["input_ids"] != own["input_ids"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent.txt", "does not exist; pass a UTF-8 text file or a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "is a folder without .txt files"),
    (lambda d: (d / "blank.txt").write_text("\n \n\n") and d / "blank.txt", "holds no text"),
    (lambda d: (d / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and d / "latin.txt",
     "is not UTF-8 text \\(byte 3\\); convert it"),
    (lambda d: (d / "few.txt").write_text("alpha beta gamma delta. " * 500) and d / "few.txt",
     "has 4 distinct words .* need at least 100"),
])
def test_bad_haystack_refused(make, message, tmp_path):
    from gate_training.data import load_haystack

    with pytest.raises(GateTrainingError, match=message):
        load_haystack(make(tmp_path))


def test_haystack_too_short_for_the_context(smollm2_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(_own_text(words=240))
    spec = PasskeySpec(num_samples=1, min_context=4000, max_context=4000, num_passkeys=2, passkey_length=4,
                       haystack=str(short))
    with pytest.raises(GateTrainingError, match="lower --max-context or pass a longer --haystack"):
        make_sample(smollm2_tokenizer, spec, 0)
