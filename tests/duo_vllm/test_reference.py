"""Tests of duo_vllm.reference: the dense DuoAttention reference against independent
computations, and the Hugging Face hook on the real SmolLM2 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duo_vllm.reference import ATTN_IMPLEMENTATION, duo_attention, use_duo_reference
from tests.helpers.attention import (  # noqa: F401  (one_thread: autouse fixture)
    DTYPES,
    HEAD_DIMS,
    HEADS,
    SEQ_LENS,
    check_close,
    make_qkv,
    one_thread,
    sdpa_causal,
)


# ----------------------------------------------------------------------------- helpers


def loop_streaming(query, key, value, *, sink, recent, scale, q_offset=None):
    """Λ attention one query at a time over an explicit list of visible key positions."""
    num_tokens, num_q_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    offset = seq_len - num_tokens if q_offset is None else q_offset
    group = num_q_heads // num_kv_heads
    kv_head = torch.tensor([h // group for h in range(num_q_heads)])
    out = torch.empty(query.shape, dtype=torch.float32)
    for t in range(num_tokens):
        i = offset + t
        js = [j for j in range(i + 1) if j < sink or i - j < recent]
        k = key[js].float()[:, kv_head]  # [n, Hq, D]
        v = value[js].float()[:, kv_head]
        scores = torch.einsum("hd,nhd->hn", query[t].float(), k) * scale
        out[t] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out.to(query.dtype)


def mixed_mask(num_q_heads, seed):
    """Random retrieval/streaming split of the query heads with both kinds when Hq > 1."""
    rng = np.random.default_rng(seed)
    mask = rng.random(num_q_heads) < 0.5
    if num_q_heads > 1:
        mask[0], mask[-1] = True, False
    return torch.from_numpy(mask)


# ----------------------------------------------------------------------------- (a) dense reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_all_retrieval_is_causal_attention(num_q_heads, num_kv_heads, head_dim, seq_len, dtype):
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=0)
    scale = head_dim**-0.5
    heads = torch.ones(num_q_heads, dtype=torch.bool)
    got = duo_attention(q, k, v, heads, sink=1, recent=1, scale=scale)
    check_close(got, sdpa_causal(q, k, v, scale), dtype,
                f"all-retrieval duo_attention vs causal SDPA, S={seq_len} Hq={num_q_heads} Hk={num_kv_heads}")
    # continuation: the last T queries only
    t = max(1, seq_len // 3)
    got_tail = duo_attention(q[-t:], k, v, heads, sink=1, recent=1, scale=scale)
    check_close(got_tail, sdpa_causal(q[-t:], k, v, scale), dtype,
                f"all-retrieval duo_attention, last {t} of {seq_len} queries, vs causal SDPA")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_mixed_heads_match_independent_computations(num_q_heads, num_kv_heads, head_dim, seq_len, dtype):
    sink, recent = 3, 11
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, head_dim, dtype, seed=seq_len)
    scale = head_dim**-0.5
    retrieval = mixed_mask(num_q_heads, seed=seq_len + num_q_heads)
    for num_tokens in sorted({seq_len, 1, min(seq_len, 7)}):
        tail = q[seq_len - num_tokens :]
        got = duo_attention(tail, k, v, retrieval, sink=sink, recent=recent, scale=scale)
        causal = sdpa_causal(tail, k, v, scale)
        streaming = loop_streaming(tail, k, v, sink=sink, recent=recent, scale=scale)
        where = (f"last {num_tokens} of S={seq_len}, Hq={num_q_heads} Hk={num_kv_heads} D={head_dim}, "
                 f"retrieval heads {torch.nonzero(retrieval).flatten().tolist()}")
        check_close(got[:, retrieval], causal[:, retrieval], dtype, f"retrieval heads vs causal SDPA, {where}")
        check_close(got[:, ~retrieval], streaming[:, ~retrieval], dtype,
                    f"streaming heads vs per-query loop, {where}")


@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_explicit_q_offset_in_the_middle(num_q_heads, num_kv_heads):
    seq_len, a, t, sink, recent = 60, 25, 9, 2, 6
    q, k, v = make_qkv(seq_len, num_q_heads, num_kv_heads, 64, torch.float32, seed=1)
    retrieval = mixed_mask(num_q_heads, seed=2)
    got = duo_attention(q[a : a + t], k, v, retrieval, sink=sink, recent=recent, scale=0.125, q_offset=a)
    full = duo_attention(q, k, v, retrieval, sink=sink, recent=recent, scale=0.125)
    check_close(got, full[a : a + t], torch.float32, f"q_offset={a} vs rows of a full prefill")
    streaming = loop_streaming(q[a : a + t], k, v, sink=sink, recent=recent, scale=0.125, q_offset=a)
    check_close(got[:, ~retrieval], streaming[:, ~retrieval], torch.float32, "streaming heads with q_offset")


def test_streaming_differs_from_causal_once_the_window_slides():
    """The comparisons above can fail: a long sequence's streaming heads are not causal."""
    q, k, v = make_qkv(99, 4, 2, 64, torch.float32, seed=3)
    streaming = duo_attention(q, k, v, torch.zeros(4, dtype=torch.bool), sink=2, recent=8, scale=0.125)
    causal = sdpa_causal(q, k, v, 0.125)
    assert (streaming - causal)[10:].abs().max().item() > 1e-2
    torch.testing.assert_close(streaming[:10], causal[:10], atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"rows before sink+recent should be causal\n{m}")


# ----------------------------------------------------------------------------- (b) Hugging Face hook

PROMPT_TOKENS = 200
HF_ATOL = 1e-3


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture
def model(hf_model):
    """The shared model, put back on stock SDPA attention after every test."""
    hf_model.set_attn_implementation("sdpa")
    yield hf_model
    hf_model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer):
    text = (
        "The lighthouse keeper wrote in her log every evening. On the first night of winter she noted "
        "that the north wind had turned, that three fishing boats came home late, and that the lamp "
        "needed new oil. Her brother, who lived inland, sent letters about the price of grain, the "
        "new railway station, and a dog that followed him to market. She answered each letter with "
        "a list of the ships she had seen, their flags and their cargo, and a drawing of the coast. "
        "Years later a historian found the logs in a box and counted four thousand ships, eleven "
        "storms and one whale that had swum into the harbour in the spring of a dry year. "
    ) * 3
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    assert ids.shape[1] == PROMPT_TOKENS
    return ids


@pytest.fixture(scope="module")
def stock_logits(hf_model, prompt_ids):
    hf_model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return hf_model(prompt_ids).logits


def _pattern(model, retrieval: bool) -> np.ndarray:
    cfg = model.config
    return np.full((cfg.num_hidden_layers, cfg.num_key_value_heads), retrieval, dtype=bool)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_stock_eager_and_sdpa_agree(model, prompt_ids, stock_logits):
    """Sanity check of the baseline the hook is compared with."""
    model.set_attn_implementation("eager")
    torch.testing.assert_close(_logits(model, prompt_ids), stock_logits, atol=HF_ATOL, rtol=0)


def test_hook_all_retrieval_equals_stock(model, prompt_ids, stock_logits):
    use_duo_reference(model, _pattern(model, True), sink=4, recent=16)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    torch.testing.assert_close(_logits(model, prompt_ids), stock_logits, atol=HF_ATOL, rtol=0,
                               msg=lambda m: f"all-retrieval hook vs stock sdpa logits\n{m}")


def test_hook_all_streaming_with_covering_window_equals_stock(model, prompt_ids, stock_logits):
    use_duo_reference(model, _pattern(model, False), sink=8, recent=PROMPT_TOKENS - 8)
    torch.testing.assert_close(_logits(model, prompt_ids), stock_logits, atol=HF_ATOL, rtol=0,
                               msg=lambda m: f"streaming hook with sink+recent >= prompt vs stock\n{m}")


def test_hook_all_streaming_short_window_differs(model, prompt_ids, stock_logits):
    use_duo_reference(model, _pattern(model, False), sink=4, recent=16)
    logits = _logits(model, prompt_ids)
    # the first sink + recent positions see everything before them: identical there
    torch.testing.assert_close(logits[:, :20], stock_logits[:, :20], atol=HF_ATOL, rtol=0)
    diff = (logits - stock_logits).abs().max().item()
    assert diff > 0.1, f"sink 4 / recent 16 streaming logits are within {diff} of full attention"


def test_hook_mixed_pattern_differs_from_both(model, prompt_ids, stock_logits):
    """A pattern with some streaming heads is neither full attention nor all-streaming."""
    mask = _pattern(model, False)
    mask[:, 0] = True
    use_duo_reference(model, mask, sink=4, recent=16)
    mixed = _logits(model, prompt_ids)
    use_duo_reference(model, _pattern(model, False), sink=4, recent=16)
    streaming = _logits(model, prompt_ids)
    assert (mixed - stock_logits).abs().max().item() > 0.1, "mixed pattern gives the stock logits"
    assert (mixed - streaming).abs().max().item() > 0.1, "mixed pattern gives the all-streaming logits"


def test_hook_cache_continuation_matches_full_forward(model, prompt_ids):
    """With a KV cache the hook sees queries = the last T of S positions: feeding the prompt
    in two pieces must give the same logits as one forward pass (streaming heads included)."""
    mask = _pattern(model, False)
    mask[::3, 1] = True
    use_duo_reference(model, mask, sink=4, recent=16)
    full = _logits(model, prompt_ids)
    split = PROMPT_TOKENS - 5
    with torch.no_grad():
        first = model(prompt_ids[:, :split], use_cache=True)
        second = model(prompt_ids[:, split:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(second.logits, full[:, split:], atol=HF_ATOL, rtol=0,
                               msg=lambda m: f"cached continuation (last 5 of {PROMPT_TOKENS}) vs full\n{m}")


def _greedy(model, ids, n=8):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_hook_greedy_generate(model, prompt_ids):
    ids = prompt_ids[:, :120]
    stock = _greedy(model, ids)
    assert len(stock) == 8
    use_duo_reference(model, _pattern(model, True), sink=4, recent=16)
    assert _greedy(model, ids) == stock, "all-retrieval hook changes greedy tokens"
    use_duo_reference(model, _pattern(model, False), sink=4, recent=16)
    streamed = _greedy(model, ids)
    assert len(streamed) == 8 and all(isinstance(t, int) for t in streamed)
    # the cached decode path must agree with recomputing the whole sequence without a cache:
    # one forward over prompt + generated tokens predicts each generated token at its position
    seq = torch.cat([ids, torch.tensor([streamed[:-1]])], dim=1)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits[0, ids.shape[1] - 1 :]
    assert logits.argmax(-1).tolist() == streamed, "streaming greedy tokens differ with/without KV cache"


def test_hook_without_pattern_raises(hf_model, prompt_ids):
    """A model switched to the duo implementation without use_duo_reference says so."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=hf_model.config.vocab_size, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        dtype=torch.float32,
    )
    use_duo_reference(tiny, np.ones((1, 1), dtype=bool), sink=4, recent=16)  # registers the function
    for module in tiny.modules():
        if hasattr(module, "duo_retrieval_q_heads"):
            del module.duo_retrieval_q_heads
    with pytest.raises(RuntimeError, match="use_duo_reference"):
        with torch.no_grad():
            tiny(prompt_ids[:, :4])


def test_hook_rejects_wrong_layer_count(model):
    bad = np.ones((model.config.num_hidden_layers + 1, model.config.num_key_value_heads), dtype=bool)
    with pytest.raises(ValueError, match="layers"):
        use_duo_reference(model, bad, sink=4, recent=16)


def test_hook_query_chunks_give_the_one_shot_logits(model, prompt_ids, monkeypatch):
    """Long prompts run in query chunks (bounded score matrix): same logits as one chunk."""
    import duo_vllm.reference as reference

    mask = _pattern(model, False)
    mask[1::2, 0] = True
    use_duo_reference(model, mask, sink=4, recent=16)
    one_shot = _logits(model, prompt_ids)
    monkeypatch.setattr(reference, "QUERY_CHUNK", 7)  # not a divisor of the prompt length
    chunked = _logits(model, prompt_ids)
    torch.testing.assert_close(chunked, one_shot, atol=1e-4, rtol=0)
    with torch.no_grad():  # and with a cache: queries are the last T of S positions
        first = model(prompt_ids[:, :-20], use_cache=True)
        second = model(prompt_ids[:, -20:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(second.logits, one_shot[:, -20:], atol=HF_ATOL, rtol=0)
