"""How far a request mix lets DUO's KV capacity pay: a two-phase model from each server's own log.

A server at memory pressure spends its time in two kinds of work. Prefill is compute-bound, so
DUO runs it at nearly stock's speed (the FLOP ratio: 1.07x for 6K-10K prompts of the Llama-3-8B
shape at 50%). Decode is bound by the KV bytes each step reads, and at memory pressure by how many
requests the KV cache holds, which is where DUO's capacity pays (1.8x on that shape). Over a whole
mix the two add up, so the throughput ratio is

    (P / prefill_stock + O / decode_stock) / (P / prefill_duo + O / decode_duo)

for P prompt and O output tokens: the prefill share caps it (Amdahl). Each server's two speeds are
read from vLLM's periodic engine statistics ("Avg prompt throughput: ... Avg generation
throughput: ... Running: N reqs, Waiting: M reqs"): prefill as the best logged prompt rate, decode
as the mean generation rate over the intervals with no prefill while requests waited (the batch
held by the KV cache: the memory-pressure steady state), else over every interval with no prefill.
Measured on an H100 (vLLM 0.33, FP8 KV, 360 requests of 6K-10K prompts and 1.1K-1.9K outputs):
the model gave 239 s for stock and 167 s for DUO (1.43x); `vllm bench serve` measured 249 s and 174 s
(1.43x). Decode alone was 1.78x there, so no mix of that shape reaches more until DUO's decode does.
"""

from __future__ import annotations

import re

ENGINE_STATS = re.compile(r"(?:Engine (\d+): )?Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: "
                          r"([\d.]+) tokens/s, Running: (\d+) reqs, Waiting: (\d+) reqs")


def phase_rates(log_text: str) -> dict | None:
    """A server's prefill and decode speeds (tokens/s) from its log, or None where it logged
    neither a prompt rate nor an interval of decode alone, or where several engines (data
    parallelism) logged their own shares of the speed."""
    found = ENGINE_STATS.findall(log_text)
    if len({engine for engine, *_ in found}) > 1:
        return None
    rows = [(float(p), float(g), int(r), int(w)) for _, p, g, r, w in found]
    prefill = max((p for p, *_ in rows), default=0.0)
    alone = [(g, w) for p, g, _, w in rows if p == 0 and g > 0]
    pressed = [g for g, w in alone if w > 0]
    decode = pressed or [g for g, _ in alone]
    if not prefill or not decode:
        return None
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": sum(decode) / len(decode),
            "decode_intervals": len(decode), "decode_at_memory_pressure": bool(pressed)}


def phase_model(rates: dict, prompt_tokens: float, output_tokens: float) -> dict | None:
    """Each server's time for the mix if prefill and decode took turns at its logged speeds, and the
    DUO / stock throughput ratio that follows; None without both servers' speeds."""
    if not (rates.get("stock") and rates.get("duo")) or prompt_tokens <= 0 or output_tokens <= 0:
        return None
    seconds = {}
    for backend in ("stock", "duo"):
        r = rates[backend]
        prefill = prompt_tokens / r["prefill_tokens_per_s"]
        decode = output_tokens / r["decode_tokens_per_s"]
        seconds[backend] = {"prefill_s": prefill, "decode_s": decode, "prefill_share": prefill / (prefill + decode)}
    total = {b: s["prefill_s"] + s["decode_s"] for b, s in seconds.items()}
    return {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "seconds": seconds,
            "decode_ratio": rates["duo"]["decode_tokens_per_s"] / rates["stock"]["decode_tokens_per_s"],
            "prefill_ratio": rates["duo"]["prefill_tokens_per_s"] / rates["stock"]["prefill_tokens_per_s"],
            "predicted_ratio": total["stock"] / total["duo"]}


def phase_line(model: dict) -> str:
    """The model in one sentence, for the benchmark's table."""
    s = model["seconds"]
    return (f"two-phase model (each server's logged speeds): prefill {model['prefill_ratio']:.2f}x, decode "
            f"{model['decode_ratio']:.2f}x; prefill is {s['stock']['prefill_share']:.0%} of stock's time and "
            f"{s['duo']['prefill_share']:.0%} of DUO's, so all at once DUO / stock = {model['predicted_ratio']:.2f}x")
