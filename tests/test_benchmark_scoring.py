"""The windowed scoring of benchmarks/laptop_vs_nanogpt.py: every byte once, as a model sees it."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from laptop_vs_nanogpt import gpt_lr, gpt_params, matching_gpt_shape, windowed_bpb  # noqa: E402

V = 7
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(0))


def bigram(x):
    return TABLE[x]  # (B, T) -> (B, T, V): the next byte's logits from this byte only


def test_windows_score_every_byte_once():
    ids = np.random.default_rng(0).integers(0, V, 1000)
    t = torch.from_numpy(ids)
    everything = F.cross_entropy(TABLE[t[:-1]], t[1:], reduction="none")
    for ctx, stride in ((16, 16), (16, 8), (10, 3), (8, 1)):
        result = windowed_bpb(bigram, ids, ctx, stride, batch=7)
        last = ctx + (result["windows"] - 1) * stride  # targets 1..last are scored
        assert result["predicted"] == last
        assert result["bpb"] == pytest.approx(float(everything[:last].mean()) / math.log(2),
                                              rel=1e-5)


def test_context_is_what_the_window_gives():
    ids = np.zeros(1 + 8 * 6, dtype=np.int64)

    def by_position(x):  # the cost of a byte falls with the context the window holds
        B, T = x.shape
        logits = torch.zeros(B, T, V)
        logits[:, :, 0] = torch.arange(T, dtype=torch.float32)
        return logits

    costs = [-math.log(math.exp(t) / (math.exp(t) + V - 1)) for t in range(8)]
    windows = windowed_bpb(by_position, ids, 8, 8)
    assert windows["bpb"] == pytest.approx(np.mean(costs) / math.log(2), rel=1e-5)
    sliding = windowed_bpb(by_position, ids, 8, 4)  # later windows: positions 4..7 only
    n = sliding["windows"]
    expected = (sum(costs) + (n - 1) * sum(costs[4:])) / (8 + (n - 1) * 4)
    assert sliding["bpb"] == pytest.approx(expected / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        windowed_bpb(by_position, ids, 8, 9)


def test_gpt_of_matching_size_and_its_schedule():
    target = 3_522_048  # RWKV L4 C256 with 199 byte values
    n_embd, n_head = matching_gpt_shape(target, 4, 199, 256)
    assert n_embd % n_head == 0 and abs(n_embd / n_head - 64) <= 16
    assert abs(gpt_params(4, n_embd, 199, 256) - target) / target < 0.02
    assert gpt_lr(0, 1000) == pytest.approx(1e-3 / 101)
    assert gpt_lr(100, 1000) == pytest.approx(1e-3)
    assert gpt_lr(550, 1000) == pytest.approx(5.5e-4)
    assert gpt_lr(1000, 1000) == pytest.approx(1e-4)
