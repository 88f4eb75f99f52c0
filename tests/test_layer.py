"""One layer's local update against a hand-written reference."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ffpipe.config import LayerConfig, OptimConfig
from ffpipe.layer import FFLayer, local_update, make_optimizer, set_lr


def _reference_loss(w, b, x_pos, x_neg, threshold):
    """The layer's loss written out from the formulas (RMS norm, relu, sum goodness, no peer norm)."""
    def act(x):
        xn = x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)
        return torch.relu(xn @ w.T + b)
    g_pos, g_neg = act(x_pos).pow(2).sum(1), act(x_neg).pow(2).sum(1)
    return 0.5 * (F.softplus(threshold - g_pos).mean() + F.softplus(g_neg - threshold).mean())


def test_local_update_matches_reference_sgd_step():
    cfg = LayerConfig(peer_norm=0.0, relu_grad="standard")
    layer = FFLayer(12, 8, cfg)
    w0, b0 = layer.linear.weight.detach().clone(), layer.linear.bias.detach().clone()
    x_pos, x_neg = torch.randn(5, 12), torch.randn(5, 12)
    opt = make_optimizer(layer.parameters(), OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0))
    result = local_update(layer, opt, x_pos, x_neg)

    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    loss = _reference_loss(w, b, x_pos, x_neg, threshold=8.0)
    loss.backward()
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert_close(layer.linear.weight.detach(), w0 - 0.1 * w.grad)
    assert_close(layer.linear.bias.detach(), b0 - 0.1 * b.grad)


def test_outputs_are_detached_and_computed_before_the_step():
    layer = FFLayer(6, 4, LayerConfig())
    x_pos, x_neg = torch.randn(3, 6), torch.randn(3, 6)
    with torch.no_grad():
        expected = layer(torch.cat([x_pos, x_neg]))
    r = local_update(layer, make_optimizer(layer.parameters(), OptimConfig()), x_pos, x_neg)
    assert not r.h_pos.requires_grad and not r.h_neg.requires_grad
    assert_close(torch.cat([r.h_pos, r.h_neg]), expected)


def test_full_gradient_relu_reaches_units_that_are_off():
    x = torch.randn(4, 6)
    for relu_grad, expect_grad in (("standard", False), ("full", True)):
        layer = FFLayer(6, 3, LayerConfig(relu_grad=relu_grad))
        with torch.no_grad():
            layer.linear.bias.fill_(-100.0)  # every unit off
        layer(x).sum().backward()
        assert (layer.linear.bias.grad.abs().sum() > 0) == expect_grad


def test_repeated_updates_separate_positive_from_negative():
    torch.manual_seed(3)
    layer = FFLayer(20, 16, LayerConfig())
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam", lr=1e-2, weight_decay=0.0))
    x_pos = torch.randn(32, 20) + 1.0
    x_neg = torch.randn(32, 20) - 1.0
    first = local_update(layer, opt, x_pos, x_neg)
    for _ in range(100):
        last = local_update(layer, opt, x_pos, x_neg)
    assert last.loss < first.loss * 0.5
    assert last.g_pos > layer.threshold > last.g_neg


def test_peer_normalization_updates_its_running_mean_buffer():
    layer = FFLayer(6, 4, LayerConfig(peer_norm=0.03, peer_momentum=0.5))
    assert "running_mean" in layer.state_dict()
    before = layer.running_mean.clone()
    x_pos = torch.randn(8, 6)
    with torch.no_grad():
        mean_activity = layer(x_pos).mean(0)
    local_update(layer, make_optimizer(layer.parameters(), OptimConfig()), x_pos, torch.randn(8, 6))
    assert_close(layer.running_mean, 0.5 * before + 0.5 * mean_activity)


def test_symba_and_mean_goodness_thresholds():
    wide = FFLayer(4, 10, LayerConfig(goodness="sum", threshold=2.0))
    assert wide.threshold == 20.0
    assert FFLayer(4, 10, LayerConfig(goodness="mean", threshold=2.0)).threshold == 2.0
    layer = FFLayer(6, 5, LayerConfig(loss="symba", peer_norm=0.0))
    r = local_update(layer, make_optimizer(layer.parameters(), OptimConfig()), torch.randn(3, 6), torch.randn(3, 6))
    assert torch.isfinite(r.loss)


def test_optimizer_choices_and_set_lr():
    layer = FFLayer(3, 2, LayerConfig())
    assert isinstance(make_optimizer(layer.parameters(), OptimConfig(name="adam")), torch.optim.Adam)
    opt = make_optimizer(layer.parameters(), OptimConfig(name="sgd"))
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    with pytest.raises(ValueError):
        dataclasses.replace(OptimConfig(), name="lbfgs")


def test_state_dict_holds_weights_bias_and_peer_mean():
    layer = FFLayer(3, 2, LayerConfig())
    assert set(layer.state_dict()) == {"linear.weight", "linear.bias", "running_mean"}
