"""Tests of duo_vllm.streaming_store.StreamingKV: writes by vLLM slot id, reads by position
through a block-table row, on a strided block-outermost view like the one vLLM binds (BLHNC:
each block also holds other layers' pages, which must never be touched)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from duo_vllm.streaming_store import StreamingKV

BLOCK_SIZES = [1, 16, 32]
DTYPES = [torch.bfloat16, torch.float32]


def block_row(num_tokens: int, block_size: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """A request's block-table row: distinct physical blocks in random order (int32, like vLLM)."""
    needed = -(-num_tokens // block_size)
    assert needed <= num_blocks
    return torch.randperm(num_blocks, generator=gen)[:needed].to(torch.int32)


def slots_for(row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return row[positions // block_size].long() * block_size + positions % block_size


def rows(num_tokens, heads, head_size, dtype, gen):
    # distinct, exactly representable values so equality checks are meaningful in bf16
    base = torch.randint(-100, 100, (num_tokens, heads, head_size), generator=gen).to(dtype)
    return base, -base - 1


SENTINEL = 12345.0


def make_store(num_blocks, block_size, heads, head_size, dtype):
    """A StreamingKV over [blocks, heads, block_size, 2 * D] carved out of a buffer whose blocks
    are wider (another page before and after it, filled with SENTINEL)."""
    page = heads * block_size * 2 * head_size
    buffer = torch.full((num_blocks, 3 * page), SENTINEL, dtype=dtype)
    buffer[:, page : 2 * page] = 0
    view = buffer[:, page : 2 * page].view(num_blocks, heads, block_size, 2 * head_size)
    store = StreamingKV(view, head_size)
    store.buffer, store.page = buffer, page
    return store


def keys_of(store):
    return store.cache[..., : store.head_size].transpose(1, 2).reshape(-1, store.num_heads, store.head_size)


def values_of(store):
    return store.cache[..., store.head_size :].transpose(1, 2).reshape(-1, store.num_heads, store.head_size)


def check_neighbours_untouched(store):
    outside = torch.cat([store.buffer[:, : store.page], store.buffer[:, 2 * store.page :]], dim=1)
    assert (outside == SENTINEL).all(), "a write reached another page of the block"


def check_equal(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=lambda m: f"{what}\n{m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", [1, 3, 19, 99])
@pytest.mark.parametrize("heads,head_size", [(1, 64), (3, 128)])
def test_round_trip_with_random_block_table(heads, head_size, num_tokens, block_size, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 100 + block_size)
    num_blocks = -(-num_tokens // block_size) * 2 + 3
    store = make_store(num_blocks, block_size, heads, head_size, dtype)
    row = block_row(num_tokens, block_size, num_blocks, gen)
    key, value = rows(num_tokens, heads, head_size, dtype, gen)
    positions = torch.arange(num_tokens)
    slots = slots_for(row, positions, block_size)
    # padded slot mapping, longer than the tokens (vLLM pads to a CUDA-graph size)
    store.write(key, value, torch.cat([slots, torch.full((5,), -1)]))

    k, v = store.gather(row, positions)
    check_equal(k, key, "gathered keys vs written keys")
    check_equal(v, value, "gathered values vs written values")

    # an arbitrary subset, in arbitrary order, with repeats
    pick = torch.randint(0, num_tokens, (7,), generator=gen)
    k, v = store.gather(row, pick)
    check_equal(k, key[pick], f"keys at positions {pick.tolist()}")
    check_equal(v, value[pick], f"values at positions {pick.tolist()}")

    # nothing outside the request's slots was touched
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not keys_of(store)[untouched].any() and not values_of(store)[untouched].any(), \
        "write touched foreign slots"
    check_neighbours_untouched(store)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_padding_entries_inside_the_batch_are_ignored(block_size):
    """Two requests in one flattened batch with padding tokens (slot -1) between and after them.
    A -1 must not write the last slot (which belongs to request B here)."""
    gen = torch.Generator().manual_seed(block_size)
    heads, head_size, num_blocks = 2, 64, 8
    n_a, n_b = 2 * block_size + 1, 3 * block_size
    store = make_store(num_blocks, block_size, heads, head_size, torch.float32)
    row_b = torch.tensor([num_blocks - 3, 1, num_blocks - 1], dtype=torch.int32)  # owns the last slot
    row_a = torch.tensor([4, 0, 2], dtype=torch.int32)
    key_a, value_a = rows(n_a, heads, head_size, torch.float32, gen)
    key_b, value_b = rows(n_b, heads, head_size, torch.float32, gen)
    pad_k = torch.full((2, heads, head_size), 999.0)
    slot_a = slots_for(row_a, torch.arange(n_a), block_size)
    slot_b = slots_for(row_b, torch.arange(n_b), block_size)
    assert int(slot_b[-1]) == num_blocks * block_size - 1
    key = torch.cat([key_a, pad_k[:1], key_b, pad_k[1:]])
    value = torch.cat([value_a, pad_k[:1], value_b, pad_k[1:]])
    minus = torch.full((1,), -1)
    store.write(key, value, torch.cat([slot_a, minus, slot_b, minus, minus, minus]))

    for name, row, n, k_ref, v_ref in (("A", row_a, n_a, key_a, value_a), ("B", row_b, n_b, key_b, value_b)):
        k, v = store.gather(row, torch.arange(n))
        check_equal(k, k_ref, f"request {name} keys")
        check_equal(v, v_ref, f"request {name} values")
    assert not (keys_of(store) == 999.0).any(), "a padding row (slot -1) was written somewhere"
    check_neighbours_untouched(store)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_chunked_writes_then_decode(block_size):
    """Prefill in chunks, then one token at a time; later writes never disturb earlier rows."""
    gen = torch.Generator().manual_seed(7)
    total, heads, head_size = 77, 3, 64
    num_blocks = -(-total // block_size) + 4
    store = make_store(num_blocks, block_size, heads, head_size, torch.bfloat16)
    row = block_row(total, block_size, num_blocks, gen)
    key, value = rows(total, heads, head_size, torch.bfloat16, gen)
    bounds = [0, 10, 11, 40, 70] + list(range(71, total + 1))
    for a, b in zip(bounds, bounds[1:]):
        store.write(key[a:b], value[a:b], slots_for(row, torch.arange(a, b), block_size))
        k, v = store.gather(row, torch.arange(b))
        check_equal(k, key[:b], f"keys after writing [{a}, {b})")
        check_equal(v, value[:b], f"values after writing [{a}, {b})")


def test_gather_uses_the_block_table():
    """A wrong block table reads other rows: the gather really goes through it."""
    store = make_store(4, 2, 1, 4, torch.float32)
    key = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 1, 4).contiguous()
    store.write(key, key, torch.arange(8))
    k, _ = store.gather(torch.tensor([3, 0, 1, 2]), torch.arange(8))
    assert k[:, 0, 0].tolist() == [6, 7, 0, 1, 2, 3, 4, 5]


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    pad_every=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_round_trip_property(block_size, lengths, pad_every, seed, data):
    """Several requests share the store; their tokens are written interleaved in a few batches
    with -1 padding sprinkled in; every request reads back exactly its own rows."""
    gen = torch.Generator().manual_seed(seed)
    heads, head_size = 2, 8
    blocks_needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_needed) + data.draw(st.integers(0, 4), label="spare blocks")
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    rows_tbl, used = [], 0
    for nb in blocks_needed:
        rows_tbl.append(perm[used : used + nb])
        used += nb
    store = make_store(num_blocks, block_size, heads, head_size, torch.float32)
    keys = [torch.randn(n, heads, head_size, generator=gen) for n in lengths]
    values = [torch.randn(n, heads, head_size, generator=gen) for n in lengths]

    # flatten every (request, position) token, shuffle into batches of random size
    tokens = [(r, p) for r, n in enumerate(lengths) for p in range(n)]
    order = torch.randperm(len(tokens), generator=gen).tolist()
    tokens = [tokens[i] for i in order]
    while tokens:
        size = data.draw(st.integers(1, len(tokens)), label="batch size")
        batch, tokens = tokens[:size], tokens[size:]
        ks, vs, slots = [], [], []
        for idx, (r, p) in enumerate(batch):
            if pad_every and idx % pad_every == 0:
                ks.append(torch.full((1, heads, head_size), float("nan")))
                vs.append(torch.full((1, heads, head_size), float("nan")))
                slots.append(-1)
            ks.append(keys[r][p : p + 1])
            vs.append(values[r][p : p + 1])
            slots.append(int(slots_for(rows_tbl[r], torch.tensor([p]), block_size)))
        store.write(torch.cat(ks), torch.cat(vs), torch.tensor(slots + [-1] * 3))

    assert not keys_of(store).isnan().any(), "a padding row (slot -1) was stored"
    check_neighbours_untouched(store)
    for r, n in enumerate(lengths):
        positions = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10),
                                           label=f"positions of request {r}"))
        k, v = store.gather(rows_tbl[r], positions)
        check_equal(k, keys[r][positions], f"request {r} keys at {positions.tolist()}")
        check_equal(v, values[r][positions], f"request {r} values at {positions.tolist()}")


def test_batched_gather_equals_per_request_gather():
    gen = torch.Generator().manual_seed(11)
    block_size, heads, head_size, num_blocks = 4, 2, 8, 12
    store = make_store(num_blocks, block_size, heads, head_size, torch.float32)
    rows_tbl = [torch.tensor([5, 2, 9], dtype=torch.int32), torch.tensor([0, 11, 3], dtype=torch.int32)]
    for row in rows_tbl:
        key, value = rows(12, heads, head_size, torch.float32, gen)
        store.write(key, value, slots_for(row, torch.arange(12), block_size))
    positions = torch.tensor([[0, 1, 7, 11], [3, 3, 10, 4]])
    k, v = store.gather_batched(torch.stack(rows_tbl), positions)
    for r, row in enumerate(rows_tbl):
        k_ref, v_ref = store.gather(row, positions[r])
        check_equal(k[r], k_ref, f"request {r} keys")
        check_equal(v[r], v_ref, f"request {r} values")
