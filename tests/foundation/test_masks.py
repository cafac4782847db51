"""Block-causal masks: the structure, its exact split into unmasked calls, its buffers."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varkit.masks import BlockCausal, PreparedMask

lengths = st.lists(st.integers(1, 9), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths, split_min=st.integers(1, 12))
def test_split_covers_every_query_once_and_only_the_head_is_masked(lengths, split_min):
    mask = BlockCausal(lengths)
    segments = mask.split(split_min)
    if segments is None:
        return
    assert segments[0].start == 0 and segments[-1].end == mask.seq_len
    assert all(a.end == b.start for a, b in itertools.pairwise(segments))
    starts = set(mask.step_starts)
    assert all(s.start in starts and s.end in starts for s in segments)  # step boundaries
    for seg in segments[1:]:  # one whole step each, long enough, needing no mask
        assert not seg.masked and seg.end - seg.start >= split_min
        assert mask.step_starts.index(seg.end) == mask.step_starts.index(seg.start) + 1
    head = segments[0]
    assert head.masked == (mask.step_starts.index(head.end) > 1)
    # Unmasked means exactly that: every query of the segment sees every key before its end.
    dense = mask.dense()
    for seg in segments[1:]:
        assert dense[seg.start : seg.end, : seg.end].all()
        assert not dense[seg.start : seg.end, seg.end :].any()


@settings(max_examples=40, deadline=None)
@given(lengths=lengths)
def test_dense_and_step_ids_describe_the_structure(lengths):
    mask = BlockCausal(lengths)
    ids = mask.step_ids()
    assert ids.tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]
    assert int(mask.dense().sum()) == mask.visible_pairs
    prepared = PreparedMask(mask)
    assert torch.equal(prepared.dense(), mask.dense()) and torch.equal(prepared.step_ids(), ids)
    assert torch.equal(PreparedMask(mask, dense=False).dense(), mask.dense())
    assert prepared.is_causal == mask.is_causal == all(n == 1 for n in lengths)


def test_split_of_vars_schedules():
    var256 = BlockCausal([n * n for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])
    assert [(s.start, s.end) for s in var256.split(64)] == [
        (0, 91),
        (91, 155),
        (155, 255),
        (255, 424),
        (424, 680),
    ]
    var512 = BlockCausal([n * n for n in (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)])
    assert len(var512.split(64)) == 6 and var512.split(64)[0].end == 66
    assert BlockCausal((64, 64)).split(64)[0].masked is False  # one step: no mask needed
    assert BlockCausal([4] * 16).split(64) is None and BlockCausal((5,)).split(1) is None


def test_prepared_mask_moves_with_its_module_and_is_not_saved():
    prepared = PreparedMask(BlockCausal((1, 2, 3)))
    assert prepared.state_dict() == {}
    with torch.device("meta"):
        meta = PreparedMask(BlockCausal((1, 2, 3)))
    assert meta.ids.is_meta and meta.visible.is_meta
    assert repr(BlockCausal((1, 2))) == "BlockCausal((1, 2))"
    with pytest.raises(ValueError, match="positive"):
        BlockCausal((1, 0))
