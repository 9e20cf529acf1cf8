"""benchmarks/_engine_phases.py: a server's prefill and decode speeds from vLLM's engine log, and
the two-phase model of a mix's DUO / stock throughput ratio."""

from __future__ import annotations

import pytest
from _engine_phases import phase_line, phase_model, phase_rates


def stats(prompt: float, generation: float, running: int, waiting: int) -> str:
    """One of vLLM's periodic engine lines, as its logger writes it (vllm/v1/metrics/loggers.py)."""
    return (f"(APIServer pid=2122) INFO 12-07 12:45:11 [loggers.py:335] Engine 000: Avg prompt throughput: "
            f"{prompt:.1f} tokens/s, Avg generation throughput: {generation:.1f} tokens/s, Running: {running} reqs, "
            f"Waiting: {waiting} reqs, GPU KV cache usage: 99.3%, Prefix cache hit rate: 0.0%")


def log(*rows) -> str:
    return "\n".join(["INFO starting", *(stats(*row) for row in rows), "INFO shutting down"])


def test_prefill_is_the_best_prompt_rate_and_decode_the_pressed_intervals():
    text = log((24000, 50, 32, 161), (36900, 250, 78, 282), (0, 3500, 104, 256), (0, 3300, 100, 260),
               (18000, 1700, 101, 100), (0, 2000, 40, 0))  # the last: the tail, nothing waiting
    rates = phase_rates(text)
    assert rates == {"prefill_tokens_per_s": 36900.0, "decode_tokens_per_s": pytest.approx(3400.0),
                     "decode_intervals": 2, "decode_at_memory_pressure": True}


def test_without_pressure_decode_is_every_interval_of_decode_alone():
    rates = phase_rates(log((5000, 0, 4, 0), (0, 300, 4, 0), (0, 100, 1, 0)))
    assert rates["decode_tokens_per_s"] == pytest.approx(200.0) and not rates["decode_at_memory_pressure"]


@pytest.mark.parametrize("text", ["", "no engine statistics here", log((30000, 0, 8, 0)), log((0, 900, 8, 2))])
def test_a_log_without_both_phases_gives_no_rates(text):
    assert phase_rates(text) is None


def test_several_engines_give_no_rates_rather_than_one_engines_share():
    text = log((30000, 0, 8, 0), (0, 900, 8, 2))
    assert phase_rates(text) is not None
    assert phase_rates(text + "\n" + stats(30000, 0, 8, 0).replace("Engine 000", "Engine 001")) is None


def test_the_model_adds_the_phases_and_prefill_caps_the_ratio():
    rates = {"stock": {"prefill_tokens_per_s": 40000.0, "decode_tokens_per_s": 2000.0},
             "duo": {"prefill_tokens_per_s": 40000.0, "decode_tokens_per_s": 4000.0}}
    model = phase_model(rates, prompt_tokens=4_000_000, output_tokens=200_000)
    # stock 100 + 100 s, DUO 100 + 50 s: twice the decode speed, 1.33x over the mix
    assert model["seconds"]["stock"] == {"prefill_s": 100.0, "decode_s": 100.0, "prefill_share": 0.5}
    assert model["predicted_ratio"] == pytest.approx(200 / 150) and model["decode_ratio"] == 2.0
    assert phase_model(rates, prompt_tokens=1, output_tokens=10**9)["predicted_ratio"] == pytest.approx(2.0, rel=1e-6)
    assert ("prefill 1.00x, decode 2.00x; prefill is 50% of stock's time and 67% of DUO's, so all at once "
            "DUO / stock = 1.33x") in phase_line(model)


def test_no_model_without_both_servers_or_tokens():
    one = {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0}
    assert phase_model({"stock": one}, 10, 10) is None
    assert phase_model({"stock": one, "duo": None}, 10, 10) is None
    assert phase_model({"stock": one, "duo": one}, 0, 10) is None
