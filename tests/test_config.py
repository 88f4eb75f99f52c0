import dataclasses

import pytest

from ffpipe import config
from ffpipe.config import LayerConfig, OptimConfig, RunConfig


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_every_preset_is_valid_and_round_trips_through_json(name):
    cfg = config.preset(name)
    assert cfg.preset == name
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_seed_preset_is_the_popular_example():
    c = config.preset("seed")
    assert c.layers == (500, 500) and c.batch_size == 50_000 and c.epochs == 1000 and c.schedule == "greedy"
    assert c.optim.name == "adam" and c.optim.lr == 0.03 and c.layer.threshold == 2.0 and c.layer.norm == "l2"


def test_hinton_preset_is_the_paper_recipe():
    c = config.preset("hinton")
    assert c.batch_size == 100 and c.schedule == "joint" and c.negatives == "hard"
    assert c.layer.norm == "rms" and c.layer.peer_norm > 0 and c.optim.schedule == "linear-half"
    assert len(c.layers) >= 3 and min(c.layers) >= 1000


def test_overrides_win_and_none_means_not_given():
    c = config.preset("hinton", epochs=3, layers=(10, 10), seed=None)
    assert c.epochs == 3 and c.layers == (10, 10) and c.seed == 0
    c = config.override_nested(c, layer=dict(norm="l2", threshold=None), optim=dict(lr=0.5))
    assert c.layer.norm == "l2" and c.layer.threshold == 1.0 and c.optim.lr == 0.5


def test_the_readout_trains_for_hard_negatives_or_when_it_predicts():
    comp = LayerConfig(loss="competitive")
    assert RunConfig().uses_readout and RunConfig().hard_negatives  # the default: hard negatives from the readout
    assert not RunConfig(layer=comp).uses_readout  # the competitive loss draws no negatives
    c = RunConfig(layer=comp, predict="readout", readout_optim=OptimConfig(name="adam", lr=1e-3))
    assert c.uses_readout and not c.hard_negatives and RunConfig.from_json(c.to_json()) == c
    c = config.override_nested(RunConfig(), readout_optim=dict(name="adam", lr=None))
    assert c.readout_optim.name == "adam" and c.readout_optim.lr == 1e-2


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(dataset="imagenet"), "dataset"), (dict(epochs=0), "epochs"), (dict(layers=()), "layers"),
     (dict(layers=(10, -1)), "width"), (dict(negatives="mined"), "negatives"), (dict(batch_size=-5), "batch_size"),
     (dict(layers=(10,), skip_first=True), "skip_first")],
)
def test_bad_settings_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**kwargs)


def test_nested_configs_validate():
    with pytest.raises(ValueError, match="norm"):
        LayerConfig(norm="batch")
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match="preset"):
        config.preset("fastest")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.preset("quick").epochs = 3


def test_seed_preset_follows_the_seed_report_per_dataset():
    mnist, cifar, fer = (config.preset("seed", dataset=d) for d in ("mnist", "cifar10", "fer2013"))
    assert (mnist.epochs, mnist.val_size) == (1000, 10_000)  # the example trains on the first 50,000 of 60,000
    assert (cifar.epochs, cifar.val_size) == (3000, 0) and (fer.epochs, fer.val_size) == (1000, 0)
    assert config.preset("seed", dataset="cifar10", epochs=5).epochs == 5  # explicit flags still win


def test_score_last_scores_with_the_last_layer_only():
    assert config.preset("quick", layers=(50, 40, 30), score_last=True).first_scored == 2
    assert config.preset("quick", layers=(50, 40, 30)).first_scored == 1
    assert config.preset("quick", layers=(50,), score_last=True).first_scored == 0  # one layer needs no --no-skip-first
