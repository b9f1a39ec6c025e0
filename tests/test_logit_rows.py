"""logit_rows: the trace's questions of a logits row (top k, kept count, rank) answered by the C++ kernel and by
PyTorch alike, ties ordered by token id as argmax breaks them, NaN and -inf never in the top."""

import math

import pytest
import torch

from lanternlm.generation import logit_rows
from lanternlm.generation.logit_rows import logit_rank, logit_rank_torch, top_logits, top_logits_torch
from lanternlm.kernels import kernels

needs_kernels = pytest.mark.skipif(kernels(quiet=True) is None, reason="the C++ kernels are not available here")


def expected_top(row: torch.Tensor, k: int) -> tuple[list[float], list[int], int]:
    """The definition, spelled out: every logit > -inf, ordered by (value descending, id ascending)."""
    pairs = [(float(v), i) for i, v in enumerate(row.tolist()) if v > -math.inf]
    pairs.sort(key=lambda p: (-p[0], p[1]))
    return [v for v, _ in pairs[:k]], [i for _, i in pairs[:k]], len(pairs)


def rows(rng: torch.Generator):
    """Rows of odd lengths (inside a 64-logit chunk, across chunks) with ties, -inf, and ties at the k-th place."""
    for n in (1, 5, 63, 64, 65, 200, 1000):
        yield torch.randn(n, generator=rng)
        few = torch.randint(0, 4, (n,), generator=rng).float()  # many ties
        yield few
        holes = torch.randn(n, generator=rng)
        holes[torch.rand(n, generator=rng) < 0.7] = -math.inf
        yield holes
    yield torch.full((70,), -math.inf)
    rising = torch.arange(300).float()  # every logit enters the top as the scan goes: the most shifting
    yield rising
    tie_at_k = torch.zeros(130)
    tie_at_k[[3, 129]] = 2.0
    yield tie_at_k  # top 3: ids 3, 129, then the lowest-id zero, 0


@pytest.mark.parametrize("k", [1, 3, 5, 64, 2000])
def test_top_logits_follows_the_definition_in_both_paths(k):
    rng = torch.Generator().manual_seed(k)
    for row in rows(rng):
        want = expected_top(row, k)
        assert top_logits_torch(row, k) == want, row
        if kernels(quiet=True) is not None:
            assert kernels().top_logits(row, k)[0].shape == (min(k, row.numel()),)
            assert top_logits(row, k) == want, row


@needs_kernels
def test_the_kernel_answers_contiguous_cpu_float32_rows_and_torch_the_rest(monkeypatch):
    calls = []
    real = logit_rows.top_logits_torch
    monkeypatch.setattr(logit_rows, "top_logits_torch", lambda x, k: calls.append(x.dtype) or real(x, k))
    row = torch.tensor([0.5, 2.0, 2.0, -1.0])
    assert top_logits(row, 2) == ([2.0, 2.0], [1, 2], 4)
    assert calls == []  # the kernel answered
    assert top_logits(row.double(), 2) == ([2.0, 2.0], [1, 2], 4)
    assert top_logits(torch.stack([row, row])[:, 1], 1) == ([2.0], [0], 2)  # not contiguous
    assert calls == [torch.float64, torch.float32]


def test_nan_is_neither_counted_nor_in_the_top():
    row = torch.tensor([1.0, math.nan, 3.0, -math.inf, math.nan, 2.0])
    assert top_logits_torch(row, 5) == ([3.0, 2.0, 1.0], [2, 5, 0], 3)
    assert top_logits(row, 5) == ([3.0, 2.0, 1.0], [2, 5, 0], 3)


def test_logit_rank_breaks_ties_by_id_in_both_paths():
    row = torch.tensor([1.0, 3.0, 1.0, 3.0, -math.inf, 0.5])
    want = {0: 3, 1: 1, 2: 4, 3: 2, 4: 6, 5: 5}
    assert {i: logit_rank_torch(row, i) for i in want} == want
    assert {i: logit_rank(row, i) for i in want} == want
    rng = torch.Generator().manual_seed(1)
    for row in rows(rng):
        for i in {0, row.numel() // 2, row.numel() - 1}:
            assert logit_rank(row, i) == logit_rank_torch(row, i)


@needs_kernels
def test_the_kernels_refuse_what_they_cannot_read():
    k = kernels()
    with pytest.raises(RuntimeError, match="float32"):
        k.top_logits(torch.zeros(4, dtype=torch.float64), 2)
    with pytest.raises(RuntimeError, match="empty"):
        k.top_logits(torch.zeros(0), 2)
    with pytest.raises(RuntimeError, match="id inside"):
        k.logit_rank(torch.zeros(4), 4)
    values, ids, kept = k.top_logits(torch.tensor([[1.0, 2.0], [-math.inf, -math.inf]]), 3)
    assert values.tolist() == [[2.0, 1.0], [-math.inf, -math.inf]] and ids.tolist() == [[1, 0], [-1, -1]]
    assert kept.tolist() == [2, 0]


def test_logit_rank_without_ties_by_id_shares_a_rank_between_equal_logits():
    row = torch.tensor([1.0, 3.0, 1.0, 3.0, -math.inf, 0.5])
    want = {0: 3, 1: 1, 2: 3, 3: 1, 4: 6, 5: 5}
    assert {i: logit_rank_torch(row, i, ties_by_id=False) for i in want} == want
    assert {i: logit_rank(row, i, ties_by_id=False) for i in want} == want


def test_one_rows_logprobs_equal_the_whole_batchs_way():
    """token_logprobs takes a decode step's single row through logit_rows (logsumexp, top k, rank) and several
    rows through log_softmax over (T, V): the same logprobs (within float32 rounding of the log-sum-exp), ranks
    and top tokens (among tied logits topk takes any, the single row the lowest ids). A row with fewer logits
    above -inf than asked for takes the (T, V) way too."""
    from lanternlm.generation.sampling import token_logprobs
    rng = torch.Generator().manual_seed(3)
    rows = [torch.randn(49152, generator=rng) * 3, torch.randint(0, 5, (300,), generator=rng).float()]
    holes = torch.full((100,), -math.inf)
    holes[[7, 40]] = torch.tensor([1.0, 2.0])
    rows.append(holes)
    for row in rows:
        assert logit_rows.in_one_pass(row) == (kernels(quiet=True) is not None)  # which way the single row takes
        for target in (0, 7, row.numel() - 1):
            for top in (0, 1, 5):
                [(lp, rank, best)] = token_logprobs(row[None], [target], top)
                [(lp2, rank2, best2), _] = token_logprobs(torch.stack([row, row]), [target, target], top)
                assert rank == rank2 and len(best) == len(best2) == top
                assert (lp == lp2 == -math.inf) or abs(lp - lp2) <= 1e-5
                assert all(a == b or abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(best, best2))
                finite = row[row > -math.inf]
                if finite.unique().numel() == finite.numel():  # no ties: the same tokens (then any -inf ones)
                    assert [i for i, _ in best][:finite.numel()] == [i for i, _ in best2][:finite.numel()]
                else:  # the lowest ids among ties, each with its own logprob
                    assert [i for i, _ in best] == expected_top(row, top)[1]
                    assert all(abs(v - float(row[i]) + float(row.logsumexp(0)))
                               <= 1e-5 for i, v in best)
