import json

import pytest

from duo_vllm.eval.store import ResultStore, StoreError, cell_key

ID = {"model": "m", "seed": 0}


def rec(index, score=100.0):
    return {"backend": "duo", "task": "needle", "length": 512, "index": index, "score": score}


def test_resume_skips_done_cells_and_refuses_another_run(tmp_path):
    key = cell_key("duo", "needle", 512, 0.5)
    store = ResultStore(tmp_path, ID)
    assert not store.done(key, 2)
    store.add_cell(key, [rec(0), rec(1)])
    again = ResultStore(tmp_path, ID)
    assert again.done(key, 2) and not again.done(key, 3)
    with pytest.raises(StoreError, match="differs in seed"):
        ResultStore(tmp_path, {**ID, "seed": 1})
    assert ResultStore(tmp_path, {**ID, "seed": 1}, fresh=True).records == []


def test_a_line_cut_short_is_redone_and_the_latest_record_wins(tmp_path):
    key = cell_key("duo", "needle", 512, None)
    store = ResultStore(tmp_path, ID)
    store.add_cell(key, [rec(0, 0.0)])
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write(json.dumps(rec(1))[:20])  # a kill mid-write
    again = ResultStore(tmp_path, ID)
    assert not again.done(key, 2)
    again.add_cell(key, [rec(0, 100.0), rec(1, 50.0)])
    final = ResultStore(tmp_path, ID).final_records()
    assert [(r["index"], r["score"]) for r in final] == [(0, 100.0), (1, 50.0)]
