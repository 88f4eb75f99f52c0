"""Prediction: batched per-label goodness against a label-by-label reference."""

import pytest
import torch
from torch.testing import assert_close

from ffpipe import config, ff
from ffpipe.model import FFNet, evaluate


def _net(**kw):
    cfg = config.preset("quick", layers=(16, 12, 8), **kw)
    return FFNet((1, 5, 5), 4, cfg)


def test_label_goodness_matches_one_label_at_a_time():
    net = _net()
    x = torch.rand(6, 25)
    batched = net.label_goodness(x, 1.0)  # (6, 4)
    for label in range(4):
        acts = net.activities(ff.overlay(x, torch.full((6,), label), 4, 1.0))
        reference = sum(layer.goodness(a) for layer, a in zip(net.layers[1:], acts[1:], strict=True))  # skips the first layer
        assert_close(batched[:, label], reference)


def test_skip_first_changes_which_layers_count():
    x = torch.rand(3, 25)
    with_first = _net(skip_first=False)
    without = _net(skip_first=True)
    without.load_state_dict(with_first.state_dict())
    acts0 = with_first.activities(ff.overlay_all_labels(x, 4))[0]
    first = with_first.layers[0].goodness(acts0).view(3, 4)
    assert_close(with_first.label_goodness(x, 1.0) - without.label_goodness(x, 1.0), first)


def test_readout_scores_use_a_neutral_pass():
    net = _net(predict="readout")
    torch.nn.init.normal_(net.readout.weight)
    x = torch.rand(5, 25)
    acts = net.activities(ff.overlay(x, None, 4, 1.0))
    assert_close(net.scores(x), net.readout(net.readout_features(acts)))
    assert net.readout.in_features == 12 + 8


def test_inputs_scale_and_standardize():
    net = _net(standardize=True)
    net.input_mean.fill_(0.5)
    net.input_std.fill_(0.25)
    images = torch.full((2, 1, 5, 5), 255, dtype=torch.uint8)
    assert_close(net.inputs(images), torch.full((2, 25), 2.0))


def test_evaluate_counts_correct_predictions():
    net = _net()
    images = torch.randint(0, 256, (30, 1, 5, 5), dtype=torch.uint8)
    preds = net.scores(net.inputs(images)).argmax(1)
    labels = preds.clone()
    labels[:10] = (labels[:10] + 1) % 4
    result = evaluate(net, images, labels, batch_size=7)
    assert abs(result["accuracy"] - 20 / 30) < 1e-6
    assert torch.equal(result["predictions"], preds)


def test_equalize_makes_inputs_independent_of_contrast():
    import torch

    from ffpipe.model import prepare_inputs

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 32, 32), generator=gen, dtype=torch.uint8)  # torchvision leaves < 256 pixels alone
    low_contrast = (images.float() * 0.3 + 90).round().to(torch.uint8)  # a monotone map of the same pictures
    zero, one = torch.zeros(1), torch.ones(1)
    plain = prepare_inputs(images, zero, one, False)
    assert not torch.allclose(plain, prepare_inputs(low_contrast, zero, one, False))
    eq_low = prepare_inputs(low_contrast, zero, one, False, equalized=True)
    eq = prepare_inputs(images, zero, one, False, equalized=True)
    # equalization depends (up to the ties the map made) only on the order of pixel values, which the map kept
    assert (eq_low - eq).abs().mean() < 0.5 * (prepare_inputs(low_contrast, zero, one, False) - plain).abs().mean()
    assert eq_low.std() > 2 * prepare_inputs(low_contrast, zero, one, False).std()  # contrast restored


def test_zca_whitening_decorrelates_the_training_inputs_and_keeps_them_in_place():
    from ffpipe.model import MAX_WHITENED, fit_whitening, prepare_inputs

    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (600, 1, 4, 4), generator=gen).float()
    images = (0.6 * base + 0.4 * base.roll(1, dims=3)).round().to(torch.uint8)  # neighbouring pixels correlated
    mean, std = torch.tensor([0.5]), torch.tensor([0.2])
    for eps in (1e-6, 1.0):
        center, matrix = fit_whitening(images, mean, std, True, False, eps, chunk=128)  # 5 chunks, the last short
        x = prepare_inputs(images, mean, std, True)
        assert_close(center, x.mean(dim=0), atol=1e-5, rtol=0)
        assert_close(matrix, matrix.T)  # ZCA: symmetric, no rotation into another basis
        white = prepare_inputs(images, mean, std, True, whiten=(center, matrix))
        cov, raw = torch.cov(white.T.double()), torch.cov(x.T.double())
        s, u = torch.linalg.eigh(raw)  # each direction's variance s becomes s / (s + eps)
        assert_close(cov, (u * (s / (s + eps))) @ u.T, atol=1e-4, rtol=1e-4)
        if eps < 1e-3:
            assert_close(cov, torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)
    # ZCA keeps each pixel where it was: a whitened pixel correlates best with its own raw value
    corr = torch.corrcoef(torch.cat([white.T, x.T]))[:16, 16:]
    assert torch.equal(corr.abs().argmax(dim=1), torch.arange(16))
    with pytest.raises(ValueError, match=f"at most {MAX_WHITENED:,} inputs"):
        fit_whitening(torch.zeros(2, 1, 65, 65, dtype=torch.uint8), mean, std, True, False, 1.0)


def test_flip_tta_adds_the_mirror_images_scores():
    net = _net()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 5, 5), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 4, (30,), generator=gen)
    both = net.scores(net.inputs(images)) + net.scores(net.inputs(images.flip(-1)))
    result = evaluate(net, images, labels, batch_size=7, tta_flip=True)
    assert torch.equal(result["predictions"], both.argmax(1))
    assert result["accuracy"] == (both.argmax(1) == labels).float().mean().item()
    assert not torch.equal(result["predictions"], evaluate(net, images, labels)["predictions"])  # the mirrors count
    symmetric = torch.cat([images[..., :3], images[..., :2].flip(-1)], dim=-1)  # each row reads the same both ways
    assert torch.equal(evaluate(net, symmetric, labels, tta_flip=True)["predictions"],
                       evaluate(net, symmetric, labels)["predictions"])


def test_both_adds_the_readouts_and_the_goodnesss_log_probabilities():
    import torch.nn.functional as F

    cfg = config.override_nested(config.preset("quick", layers=(16, 12, 8), negatives="random", predict="readout"),
                                 layer=dict(loss="competitive", peer_norm=0.0))
    net = FFNet((1, 5, 5), 4, cfg)
    torch.nn.init.normal_(net.readout.weight, generator=torch.Generator().manual_seed(1))
    x = torch.rand(9, 25)
    both = net.scores(x, "both")
    assert_close(both, F.log_softmax(net.scores(x, "readout"), 1) + F.log_softmax(net.scores(x, "goodness"), 1))
    assert both.shape == (9, 4) and bool((both <= 0).all())  # the log of a product of probabilities
