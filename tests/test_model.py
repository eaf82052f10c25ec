from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from equip.config.checks import check_model
from equip.errors import EquipError
from equip.model.cnn import Classifier, build_net, mflops_per_image
from tests.conftest import make_cfg


def model(**changes) -> dict:
    m = OmegaConf.to_container(make_cfg().model)
    m.update(changes)
    return m


@pytest.mark.parametrize(
    ("changes", "image_size", "message"),
    [
        ({"filters": [8] * 6}, 32, r"6 pooling blocks shrink a 32 px image below 1 px"),
        ({"filters": [8, 16], "kernel_sizes": [3, 3, 3]}, 32, r"model.kernel_sizes=\[3, 3, 3\]"),
        ({"kernel_sizes": [3, 0]}, 32, r"block 1 has kernel 0"),
        ({"lr": 0.0}, 32, r"model.lr=0.0 must be positive"),
        ({"lr": -1e-3}, 32, r"model.lr=-0.001 must be positive"),
        ({"filters": []}, 32, r"model.filters=\[\] must be a non-empty list"),
        ({"dropout": 1.0}, 32, r"model.dropout=1.0"),
    ],
)
def test_impossible_architectures_are_refused_with_the_key(changes, image_size, message):
    with pytest.raises(EquipError, match=message):
        check_model(model(**changes), image_size)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"filters": [8, 16, 32], "kernel_sizes": [5, 3, 3], "batch_norm": True},
        {"head": "gap", "hidden": [16], "dropout": 0.2, "activation": "gelu"},
        {"pool": "avg", "activation": "silu"},
        {"pool": "none", "filters": [4]},
    ],
)
def test_configured_networks_classify_uint8_images(changes):
    net = build_net(model(**changes), num_classes=5, image_size=16)
    out = net(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))
    assert out.shape == (2, 5) and out.dtype == torch.float32


def test_filters_set_the_number_of_conv_layers():
    net = build_net(model(filters=[4, 8, 16, 32]), num_classes=3, image_size=32)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net) == 4


def test_mflops_match_the_hand_count_for_one_conv():
    m = model(filters=[4], kernel_sizes=3)
    net = build_net(m, num_classes=2, image_size=8)
    conv = 2 * 3 * 4 * 9 * 8 * 8  # 2 * c_in * c_out * k^2 * output pixels
    dense = 2 * (4 * 4 * 4) * 2
    assert mflops_per_image(net, 8) == pytest.approx((conv + dense) / 1e6)
    assert net.training  # counting must not leave the net in eval mode


def test_checkpointable_module_rebuilds_from_its_hyperparameters(tmp_path):
    m = Classifier(model(filters=[4, 8]), ["a", "b", "c"], 16)
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = Classifier.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    assert loaded.classes == ["a", "b", "c"]
    assert torch.equal(loaded.eval()(x), m.eval()(x))


def test_unknown_monitor_is_refused():
    from equip.config.checks import check_trainer
    from equip.config.explain import config_errors

    with pytest.raises(EquipError, match="trainer.monitor='val_f1' is not one of"), config_errors():
        make_cfg("trainer.monitor=val_f1")  # the schema's Enum refuses it while composing
    check_trainer(make_cfg("trainer.monitor=val_loss").trainer)
