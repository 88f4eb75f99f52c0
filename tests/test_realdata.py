"""Real MNIST from ../shared/data: a small net trained briefly reaches a sensible accuracy."""

import pytest

from ffpipe import config, data, inprocess


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_net_learns_real_mnist(shared_data, tmp_path):
    mnist = data.load("mnist", shared_data, download=False)
    assert len(mnist.train) == 60_000 and len(mnist.test) == 10_000
    assert mnist.train.y[:1].item() == 5 and mnist.test.y[:1].item() == 7  # the official order
    cfg = config.preset("quick", dataset="mnist", layers=(200, 200), epochs=2, threads=2, out=str(tmp_path))
    summary = inprocess.train(cfg, mnist, show_progress=False)
    assert summary["test_accuracy"] > 0.90, summary["history"]
