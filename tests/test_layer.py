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


# ---- image layers: the registry, shapes, and their math against written-out references

from ffpipe import ff  # noqa: E402
from ffpipe.config import preset  # noqa: E402
from ffpipe.layer import ConvFFLayer, LayerSpec, LocalFFLayer, build_layer, out_widths, plan  # noqa: E402


def test_layer_specs_parse_print_and_size_a_cifar_net():
    assert str(LayerSpec.parse("CONV64p2")) == "conv64k3p2" and str(LayerSpec.parse(" 500 ")) == "500"
    assert LayerSpec.parse("lc32k5s2") == LayerSpec("lc", 32, 5, 2, 1)
    shapes = [(str(s), i, o) for s, i, o in plan(["conv64k3p2", "lc32k5s2", 1000], (3, 32, 32))]
    assert shapes == [("conv64k3p2", (3, 32, 32), (64, 16, 16)), ("lc32k5s2", (64, 16, 16), (32, 8, 8)),
                      ("1000", (32, 8, 8), (1000,))]
    assert out_widths(["conv64k3p2", 1000], (3, 32, 32)) == [64 * 16 * 16, 1000]
    assert out_widths([500, 500], None) == [500, 500]
    for bad in ("conv", "conv0", "fc500", "-3", "conv8k3p0", "lc8x"):
        with pytest.raises(ValueError, match="not a width|positive"):
            LayerSpec.parse(bad)
    with pytest.raises(ValueError, match="needs the input"):
        out_widths(["conv8", 10], None)
    with pytest.raises(ValueError, match="too small"):
        plan(["conv8p4", "conv8p4", "conv8p4"], (1, 8, 8))
    with pytest.raises(ValueError, match="cannot follow"):
        preset("quick", layers=(500, "conv8"))
    assert preset("quick", layers=("CONV8p2", "500")).layers == ("conv8k3p2", 500)


def _image_cfg(**kw):
    return LayerConfig(peer_norm=0.0, relu_grad="standard", **kw)


def test_conv_layer_reads_the_label_from_the_overlay_as_a_channel_bias():
    classes, shape = 3, (2, 5, 5)
    layer = build_layer(0, "conv4k3", shape, _image_cfg(), seed=1, num_classes=classes)
    assert isinstance(layer, ConvFFLayer) and layer.out_features == 4 * 5 * 5
    x = torch.randn(6, 50)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    xo = ff.overlay(x, y, classes, value=1.0)
    image = x.clone()
    image[:, :classes] = 0  # the label slots are not image
    z = F.conv2d(ff.normalize(image, "rms").view(6, *shape), layer.conv.weight, layer.conv.bias, padding=1)
    expected = torch.relu(z + layer.label[y][:, :, None, None]).flatten(1)
    assert_close(layer(xo), expected)
    # what the overlay covered does not matter; the label does
    assert_close(layer(ff.overlay(x + 5 * (torch.arange(50) < classes), y, classes)), layer(xo))
    assert not torch.allclose(layer(ff.overlay(x, (y + 1) % classes, classes)), layer(xo))
    # deeper image layers take no label
    assert build_layer(1, "conv4k3", shape, _image_cfg(), seed=1, num_classes=classes).label_classes == 0


def test_locally_connected_layer_matches_a_per_position_reference():
    classes, (c, h, w), k, s = 2, (2, 5, 5), 3, 2
    layer = build_layer(0, "lc3k3s2p1", (c, h, w), _image_cfg(norm="l2"), seed=0, num_classes=classes)
    assert isinstance(layer, LocalFFLayer) and layer.grid == (3, 3)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, c * h * w)
    y = torch.tensor([0, 1, 1, 0])
    xo = ff.overlay(x, y, classes)
    image = xo.clone()
    image[:, :classes] = 0
    padded = F.pad(ff.normalize(image, "l2").view(4, c, h, w), (1, 1, 1, 1))
    expected = torch.empty(4, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            patch = padded[:, :, i * s : i * s + k, j * s : j * s + k].permute(0, 2, 3, 1).reshape(4, -1)  # (B, k*k*C)
            z = patch @ layer.filters[i * 3 + j] + layer.bias[:, i, j] + layer.label[y][:, :, i, j]
            expected[:, :, i, j] = torch.relu(z)
    out = layer(xo)
    assert_close(out, expected.flatten(1))
    # and so do its gradients (the batched matmul's backward is arranged by hand for speed)
    g = torch.randn_like(out)
    params = [layer.filters, layer.bias, layer.label]
    assert_close(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((expected.flatten(1) * g).sum(), params))


@pytest.mark.parametrize("competitive", [False, True])
def test_a_pooled_locally_connected_layer_is_max_pooling_of_the_unpooled_one(competitive):
    """Its pooling runs on its own (H, W, B, C) layout; the same windows, values and gradients as max_pool2d's."""
    classes, shape = 2, (3, 6, 7)  # 7 columns: pooling by 2 drops the last, as max_pool2d does
    cfg = _image_cfg(loss="competitive") if competitive else _image_cfg()
    pooled = build_layer(0, "lc4k3p2", shape, cfg, seed=0, num_classes=classes)
    flat = build_layer(0, "lc4k3", shape, cfg, seed=0, num_classes=classes)
    with torch.no_grad():
        pooled.bias.normal_()
    with torch.no_grad():
        for a, b in zip(flat.parameters(), pooled.parameters(), strict=True):
            a.copy_(b)
    x = ff.overlay(torch.randn(5, 3 * 6 * 7), torch.tensor([0, 1, 1, 0, 1]), classes)
    out = pooled(x)
    expected = F.max_pool2d(flat(x).view(5, 4, 6, 7), 2).flatten(1)
    assert out.shape == (5, 4 * 3 * 3) and torch.equal(out, expected)
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad((out * g).sum(), list(pooled.parameters())),
                 torch.autograd.grad((expected * g).sum(), list(flat.parameters())))


def test_a_locally_connected_checkpoint_from_before_the_row_column_channel_layout_still_evaluates_but_does_not_resume():
    from ffpipe.checkpoint import CheckpointError
    from ffpipe.config import preset
    from ffpipe.inprocess import restore
    from ffpipe.model import FFNet

    cfg = preset("quick", layers=["lc3k3s2", 8])
    net = FFNet((2, 5, 5), 2, cfg)
    state = net.state_dict()
    p, f, o = state["layers.0.filters"].shape  # the earlier layout: inputs ordered (channel, row, column), named `weight`
    state["layers.0.weight"] = state.pop("layers.0.filters").view(p, 3, 3, 2, o).permute(0, 3, 1, 2, 4).reshape(p, f, o)
    fresh = FFNet((2, 5, 5), 2, dataclasses.replace(cfg, seed=1))
    assert fresh.layers[0].resumable
    fresh.load_state_dict(state)
    assert torch.equal(fresh.layers[0].filters, net.layers[0].filters) and not fresh.layers[0].resumable
    x = torch.randn(3, 50)
    assert_close(fresh.layers[0](x), net.layers[0](x))
    with pytest.raises(CheckpointError, match="ordered their inputs .channel, row, column.* start a fresh run"):
        restore({"model": state}, FFNet((2, 5, 5), 2, cfg), [], None, None)


def test_an_image_layer_learns_by_the_same_local_update():
    layer = build_layer(0, "conv4k3p2", (1, 8, 8), _image_cfg(goodness="sum", threshold=1.0), seed=0, num_classes=10)
    assert layer.threshold == 4 * 4 * 4  # sum goodness: per unit threshold times the (pooled) units
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam", lr=0.01))
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 64, generator=gen)
    y = torch.randint(0, 10, (200,), generator=gen)
    x = protos[y] + 0.3 * torch.randn(200, 64, generator=gen)
    neg = ff.random_wrong_labels(y, 10, gen)
    losses = [local_update(layer, opt, ff.overlay(x, y, 10), ff.overlay(x, neg, 10)).loss.item() for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0]
    # the label bias learned too
    assert not torch.equal(layer.label.detach(), build_layer(0, "conv4k3p2", (1, 8, 8), _image_cfg(), seed=0, num_classes=10).label)


def test_competitive_loss_is_cross_entropy_over_each_class_groups_goodness():
    cfg = LayerConfig(loss="competitive", peer_norm=0.0, relu_grad="standard")
    fc = build_layer(0, 6, (5,), cfg, seed=0, num_classes=3)
    h = torch.rand(4, 6)
    y = torch.tensor([0, 2, 1, 2])
    # unit k belongs to class k mod 3: class 0 owns units 0 and 3
    expected = torch.stack([(h[:, [k, k + 3]] ** 2).mean(1) for k in range(3)], dim=1)
    assert_close(fc.class_goodness(h), expected)
    loss, g_pos, g_neg = fc.objective(h, None, y)
    assert_close(loss, F.cross_entropy(expected, y))
    assert_close(g_pos, expected[torch.arange(4), y])
    # image layers group channels (over every position); no label is read from the inputs
    conv = build_layer(0, "conv5k3", (1, 4, 4), cfg, seed=0, num_classes=2)
    assert conv.label_classes == 0
    h = torch.rand(3, 5 * 16)
    per_channel = (h.view(3, 5, 16) ** 2).mean(2)
    assert_close(conv.class_goodness(h), torch.stack([per_channel[:, [0, 2, 4]].mean(1), per_channel[:, [1, 3]].mean(1)], 1))
    with pytest.raises(ValueError, match="one channel per class"):
        build_layer(0, "conv4k3", (1, 4, 4), cfg, seed=0, num_classes=10)
    r = local_update(fc, make_optimizer(fc.parameters(), OptimConfig(lr=0.1)), torch.rand(4, 5), None, y)
    assert r.h_neg is None and r.h_pos.shape == (4, 6)


def test_set_compute_pins_the_threads_and_flushes_subnormal_floats_to_zero():
    from ffpipe.layer import set_compute

    tiny = torch.tensor([1e-40])  # a subnormal float32: the kind that slowed a long conv run's steps tenfold
    assert (tiny * 1.0).item() != 0.0
    try:
        set_compute(1)
        assert torch.get_num_threads() == 1 and (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


# (index, spec, input shape, loss, relu_grad): every layer kind and loss; layer 0 with its label bias; geometries
# where max pooling drops the last row and column (k1p2 on 5x5, k3p3 on 8x8) or a stride steps over it (k1s2)
NONFINITE_CASES = [(1, 12, (2, 4, 4), "threshold", "standard"), (1, 12, (2, 4, 4), "symba", "full"),
                   (1, 12, (2, 4, 4), "competitive", "standard"), (0, 12, (2, 4, 4), "threshold", "full"),
                   (1, "conv4k3p2", (2, 4, 4), "threshold", "standard"), (0, "conv4k3p2", (2, 4, 4), "threshold", "full"),
                   (1, "conv4k1p2", (1, 5, 5), "threshold", "standard"), (1, "conv4k3p3", (1, 8, 8), "competitive", "full"),
                   (1, "conv4k1s2", (1, 6, 6), "threshold", "standard"), (1, "lc4k3p2", (2, 4, 4), "threshold", "standard"),
                   (0, "lc4k3p2", (2, 4, 4), "threshold", "full"), (1, "lc4k3p2", (2, 4, 4), "competitive", "standard"),
                   (1, "lc4k3p3", (1, 8, 8), "threshold", "full"), (1, "lc4k1s2", (1, 6, 6), "symba", "standard")]


@pytest.fixture(params=["loss read first", "step skipped on the device"])
def loss_check(request, monkeypatch):
    """How `step_if_finite` refuses a non-finite loss: read before the step (the CPU), or, as on a GPU, by the fused
    optimizer skipping the step on the device and the loss read after it (run here with the CPU's fused kernels)."""
    from ffpipe import layer as layer_module

    if request.param == "step skipped on the device":
        monkeypatch.setattr(layer_module, "READ_LOSS_FIRST", ())
    return request.param


def _assert_path_taken(opt, loss_check):
    """The optimizer was told of the loss on the device exactly when that path was under test."""
    assert (getattr(opt, "found_inf", None) is not None) == (loss_check == "step skipped on the device")


@pytest.mark.parametrize("index, spec, shape, loss, relu_grad", NONFINITE_CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_inf_anywhere_in_a_batch_is_refused_by_the_loss_and_changes_nothing(index, spec, shape, loss, relu_grad, bad,
                                                                                       loss_check):
    """What lets a pipeline layer skip a pass over its inputs on decoding: one NaN or Inf, at any position of
    either half of the batch, makes the loss non-finite, and local_update refuses it without changing anything
    (weights, optimizer state, the peer-norm mean the objective updates)."""
    import copy
    import math

    from ffpipe.layer import NonFiniteLoss

    competitive, classes = loss == "competitive", 4
    layer = build_layer(index, spec, shape, LayerConfig(loss=loss, peer_norm=0.03, relu_grad=relu_grad), seed=0,
                        num_classes=classes)
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam", lr=1e-2))
    gen = torch.Generator().manual_seed(0)
    x_pos, x_neg = (torch.rand(6, math.prod(shape), generator=gen) for _ in range(2))
    y = torch.arange(6) % classes
    local_update(layer, opt, x_pos, None if competitive else x_neg, y)  # the optimizer has state to lose
    weights, state = copy.deepcopy(layer.state_dict()), copy.deepcopy(opt.state_dict())
    halves = ("pos",) if competitive else ("pos", "neg")
    for half in halves:
        for at in range(x_pos.numel()):  # every position of the batch
            p, n = x_pos.clone(), x_neg.clone()
            (p if half == "pos" else n).view(-1)[at] = bad
            with pytest.raises(NonFiniteLoss, match="not finite"):
                local_update(layer, opt, p, None if competitive else n, y)
    for key, value in weights.items():
        assert torch.equal(layer.state_dict()[key], value), key
    assert_close(opt.state_dict(), state, rtol=0, atol=0)
    _assert_path_taken(opt, loss_check)
    local_update(layer, opt, x_pos, None if competitive else x_neg, y)  # and it goes on learning
    assert all(torch.isfinite(v).all() for v in layer.state_dict().values())
    assert int(opt.state_dict()["state"][0]["step"]) == 2  # the refused steps did not count


def test_a_loss_only_its_peer_norm_term_makes_infinite_is_refused_before_the_running_mean_moves(loss_check):
    """A diverged layer: positives overflow their goodness (whose loss term is then 0), negatives are off, so only
    the peer-norm term is infinite. The check covers the whole loss, and the running mean keeps its value."""
    import copy

    from ffpipe.layer import NonFiniteLoss

    layer = FFLayer(4, 3, LayerConfig(peer_norm=0.03, relu_grad="standard"))
    with torch.no_grad():
        layer.linear.weight.zero_()
        layer.linear.bias.zero_()
        layer.linear.weight[0] = 1e30
    x_pos, x_neg = torch.ones(2, 4), -torch.ones(2, 4)
    with torch.no_grad():  # the precondition: the goodness loss alone is finite
        h_pos, h_neg = layer(x_pos), layer(x_neg)
        assert torch.isfinite(ff.threshold_loss(layer.goodness(h_pos), layer.goodness(h_neg), layer.threshold))
    before = copy.deepcopy(layer.state_dict())
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam"))
    with pytest.raises(NonFiniteLoss):
        local_update(layer, opt, x_pos, x_neg)
    for key, value in before.items():
        assert torch.equal(layer.state_dict()[key], value), key
    _assert_path_taken(opt, loss_check)


def test_sgd_with_momentum_reads_the_loss_first_until_its_buffers_exist(monkeypatch):
    """torch's fused SGD skipping its first step on the device leaves the momentum buffers it has just made
    uninitialised, and the next step reads them. So until they exist the loss is read before the step, even where
    the step could be skipped on the device; after that the device skips it."""
    import copy

    from ffpipe import layer as layer_module
    from ffpipe.layer import NonFiniteLoss, _skips_on_device

    monkeypatch.setattr(layer_module, "READ_LOSS_FIRST", ())
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x_pos, x_neg = torch.rand(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    nan = x_pos.clone()
    nan[1, 2] = float("nan")
    layer = FFLayer(6, 5, LayerConfig(peer_norm=0.0))
    reference = copy.deepcopy(layer)
    opt, ref_opt = make_optimizer(layer.parameters(), cfg), make_optimizer(reference.parameters(), cfg)
    assert not _skips_on_device(opt)
    with pytest.raises(NonFiniteLoss):
        local_update(layer, opt, nan, x_neg)
    assert getattr(opt, "found_inf", None) is None and not opt.state  # read first: no buffers were made
    for o, l in ((opt, layer), (ref_opt, reference)):
        local_update(l, o, x_pos, x_neg)
        local_update(l, o, x_neg, x_pos)
    assert _skips_on_device(opt)
    with pytest.raises(NonFiniteLoss):
        local_update(layer, opt, nan, x_neg)
    assert getattr(opt, "found_inf", None) is not None  # skipped on the device
    local_update(layer, opt, x_pos, x_neg)
    local_update(reference, ref_opt, x_pos, x_neg)
    for key, value in reference.state_dict().items():
        assert_close(layer.state_dict()[key], value, rtol=0, atol=0)
    assert_close(opt.state_dict(), ref_opt.state_dict(), rtol=0, atol=0)


def test_a_step_after_a_device_side_refusal_is_not_skipped_by_its_stale_flag(monkeypatch):
    """The flag a refused step left on the optimizer must not skip the next step, whichever path that one takes."""
    from ffpipe import layer as layer_module
    from ffpipe.layer import NonFiniteLoss

    layer = FFLayer(6, 5, LayerConfig(peer_norm=0.0))
    opt = make_optimizer(layer.parameters(), OptimConfig(name="adam", lr=0.1))
    x_pos, x_neg = torch.rand(4, 6), torch.rand(4, 6)
    monkeypatch.setattr(layer_module, "READ_LOSS_FIRST", ())
    local_update(layer, opt, x_pos, x_neg)
    with pytest.raises(NonFiniteLoss):
        local_update(layer, opt, x_pos * float("nan"), x_neg)
    monkeypatch.setattr(layer_module, "READ_LOSS_FIRST", ("cpu",))
    before = layer.linear.weight.detach().clone()
    local_update(layer, opt, x_pos, x_neg)
    assert not torch.equal(layer.linear.weight, before)
    assert int(opt.state_dict()["state"][0]["step"]) == 2


def test_the_readout_refuses_a_non_finite_loss_and_changes_nothing(loss_check):
    import copy

    from ffpipe.layer import NonFiniteLoss
    from ffpipe.model import readout_step

    readout = torch.nn.Linear(6, 3, bias=False)
    opt = make_optimizer(readout.parameters(), OptimConfig(name="adam", lr=0.1))
    feats, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 0])
    readout_step(readout, opt, feats, y)
    weights, state = copy.deepcopy(readout.state_dict()), copy.deepcopy(opt.state_dict())
    feats[2, 3] = float("inf")
    with pytest.raises(NonFiniteLoss, match="readout's loss is not finite"):
        readout_step(readout, opt, feats, y)
    assert_close(readout.state_dict(), weights, rtol=0, atol=0)
    assert_close(opt.state_dict(), state, rtol=0, atol=0)
    _assert_path_taken(opt, loss_check)


def test_the_gpu_finite_check_script_passes_on_the_device_path_and_fails_on_the_other():
    """scripts/gpu_finite_check.py, which scripts/gpu_session.sh runs on a lent GPU, on the CPU: with --as-gpu it
    takes the device path and passes; without, the CPU reads the loss first, which the script must report."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_finite_check.py"
    ok = subprocess.run([sys.executable, str(script), "--device", "cpu", "--as-gpu"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.count(": ok") == 5, ok.stdout + ok.stderr
    other = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and other.stdout.count("FAILED: the loss was read before the step") == 5, other.stdout
