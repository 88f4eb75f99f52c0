"""The FF math against hand-computed references."""

import math

import pytest
import torch
from torch.testing import assert_close

from ffpipe import ff


def test_normalize_l2_and_rms_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert_close(ff.normalize(x, "l2", eps=0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # rms of [3, 4] is sqrt(12.5)
    r = math.sqrt(12.5)
    assert_close(ff.normalize(x, "rms", eps=0), torch.tensor([[3 / r, 4 / r], [0.0, math.sqrt(2)]]))
    assert_close(ff.normalize(x, "rms").pow(2).mean(1), torch.ones(2))


def test_normalize_rejects_unknown_kind():
    with pytest.raises(ValueError, match="normalization"):
        ff.normalize(torch.ones(1, 2), "batch")


def test_goodness_mean_and_sum():
    h = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    assert_close(ff.goodness(h, "sum"), torch.tensor([9.0, 9.0]))
    assert_close(ff.goodness(h, "mean"), torch.tensor([3.0, 3.0]))


def test_threshold_loss_by_hand():
    g_pos, g_neg = torch.tensor([3.0, 1.0]), torch.tensor([0.5])
    theta = 2.0
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((sp(theta - 3.0) + sp(theta - 1.0)) / 2 + sp(0.5 - theta))
    assert ff.threshold_loss(g_pos, g_neg, theta).item() == pytest.approx(expected, rel=1e-6)


def test_symba_loss_by_hand():
    g_pos, g_neg = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0])
    alpha = 4.0
    expected = (math.log1p(math.exp(-alpha * 2.0)) + math.log1p(math.exp(-alpha * -1.0))) / 2
    assert ff.symba_loss(g_pos, g_neg, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_peer_loss_is_variance_of_unit_means():
    m = torch.tensor([1.0, 2.0, 3.0])
    assert ff.peer_loss(m).item() == pytest.approx(2 / 3)
    assert ff.peer_loss(torch.full((5,), 0.7)).item() == 0.0


def test_overlay_writes_one_hot_and_leaves_input_alone():
    x = torch.rand(3, 20)
    before = x.clone()
    out = ff.overlay(x, torch.tensor([0, 4, 9]), 10, value=2.0)
    assert_close(x, before)
    assert_close(out[:, 10:], x[:, 10:])
    expected = torch.zeros(3, 10)
    expected[0, 0] = expected[1, 4] = expected[2, 9] = 2.0
    assert_close(out[:, :10], expected)
    neutral = ff.overlay(x, None, 10, value=1.0)
    assert_close(neutral[:, :10], torch.full((3, 10), 0.1))


def test_overlay_all_labels_matches_one_by_one():
    x = torch.rand(4, 15)
    every = ff.overlay_all_labels(x, 5).view(4, 5, 15)
    for label in range(5):
        assert_close(every[:, label], ff.overlay(x, torch.full((4,), label), 5))


def test_random_wrong_labels_never_true_and_cover_every_wrong_label():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (20_000,), generator=gen)
    wrong = ff.random_wrong_labels(labels, 10, gen)
    assert (wrong != labels).all()
    assert wrong.min() >= 0 and wrong.max() <= 9
    # uniform over the 9 wrong labels: each offset 1..9 appears ~1/9 of the time
    counts = torch.bincount((wrong - labels) % 10, minlength=10)
    assert counts[0] == 0
    assert (counts[1:].float() / len(labels) - 1 / 9).abs().max() < 0.01


def test_hard_wrong_labels_follow_belief_and_never_equal_truth():
    gen = torch.Generator().manual_seed(2)
    labels = torch.zeros(5000, dtype=torch.long)
    scores = torch.zeros(5000, 10)
    scores[:, 0] = 50.0  # confident and right: must still pick a wrong label
    scores[:, 3] = 5.0  # the most plausible wrong label
    wrong = ff.hard_wrong_labels(scores, labels, gen)
    assert (wrong != labels).all()
    share = (wrong == 3).float().mean().item()
    expected = math.exp(5) / (math.exp(5) + 8)  # softmax over wrong labels only
    assert share == pytest.approx(expected, abs=0.02)


def test_hard_wrong_labels_fall_back_to_uniform_when_belief_is_certain():
    scores = torch.full((100, 4), -1e9)
    scores[:, 1] = 1e9
    labels = torch.ones(100, dtype=torch.long)
    wrong = ff.hard_wrong_labels(scores, labels, torch.Generator().manual_seed(0))
    assert (wrong != 1).all()


@pytest.mark.parametrize(
    "schedule,epoch,expected",
    [("constant", 7, 1.0), ("linear-half", 0, 1.0), ("linear-half", 4, 1.0), ("linear-half", 5, 1.0),
     ("linear-half", 6, 0.8), ("linear-half", 9, 0.2), ("cosine", 0, 1.0), ("cosine", 5, 0.5)],
)
def test_lr_factor(schedule, epoch, expected):
    assert ff.lr_factor(epoch, 10, schedule) == pytest.approx(expected)


def test_lr_factor_rejects_unknown():
    with pytest.raises(ValueError, match="schedule"):
        ff.lr_factor(0, 10, "step")
