"""Report helpers that the plots and the text summary share."""

from __future__ import annotations

import pytest

from duo_vllm.eval.report import _short_length


@pytest.mark.parametrize("n,label", [(512, "512"), (4000, "4K"), (4096, "4K"), (32000, "32K"),
                                     (32768, "32K"), (131072, "128K"), (1536, "1.5K"), (2500, "2.5K"), (12345, "12.3K"), (24000, "24K")])
def test_length_labels_round_in_the_unit_the_length_was_given(n, label):
    assert _short_length(n) == label
