"""The typed config (equip.config.schema): every option of every group composes and passes the
checks; a wrong type, choice or key fails while composing, in one line naming key and value."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from equip.config.checks import check_config
from equip.config.choices import Activation, Pool
from equip.config.explain import config_errors
from equip.errors import EquipError
from tests.conftest import ROOT, make_cfg

CONF = ROOT / "conf"
# What each option needs besides itself to pass check_config.
NEEDS = {
    "data=folder": ["data.root=photos"],
    "experiment=gear": ["data.root=photos"],
    "experiment=small_images": ["data.root=photos"],
}


def options() -> list[str]:
    """group=option for every YAML file of every config group (sweeps/ is conf/sweep)."""
    found = [
        f"{group.name}={path.stem}"
        for group in sorted(CONF.iterdir())
        if group.is_dir() and group.name not in ("hydra", "launch")
        for path in sorted(group.glob("*.yaml"))
        if path.stem != "common"  # data/common.yaml: what data sets share, not one itself
    ]
    launchers = sorted((CONF / "hydra" / "launcher").glob("*.yaml"))
    return [*found, *(f"hydra/launcher={p.stem}" for p in launchers), "+launch=azureml"]


def test_the_options_are_found():
    assert {"data=folder", "model=baseline", "sweep=cv", "hydra/launcher=ray"} <= set(options())


@pytest.mark.parametrize("option", options())
def test_every_option_composes_and_passes_the_checks(option: str):
    cfg = make_cfg(option, *NEEDS.get(option, []), tiny=False)
    check_config(cfg)


def grid(*arguments: str) -> list[list[str]]:
    """The jobs of `python train.py -m ARGUMENTS`, as Hydra's basic sweeper makes them."""
    choices = []
    for o in OverridesParser.create().parse_overrides(list(arguments)):
        key = o.get_key_element()
        values = (
            o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        )
        choices.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*choices)]


@pytest.mark.parametrize("name", ["smoke", "architecture", "cv"])
def test_every_point_of_every_grid_sweep_composes(name: str):
    params = OmegaConf.load(CONF / "sweep" / f"{name}.yaml").hydra.sweeper.params
    points = grid(*(f"{k}={v}" for k, v in params.items()))
    assert len(points) > 1
    for point in points:
        check_config(make_cfg(f"sweep={name}", *point, tiny=False))


def test_a_command_line_grid_still_sweeps_lists():
    points = grid("model.filters=[32,64],[32,64,128]")
    assert [make_cfg(*p).model.filters for p in points] == [[32, 64], [32, 64, 128]]


def test_ints_are_accepted_where_floats_are_typed():
    cfg = make_cfg("model.lr=1", "data.augment.rotation=10")
    assert cfg.model.lr == 1.0 and isinstance(cfg.model.lr, float)
    check_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ["model.tta=vflip"],
            "model.tta='vflip' is not one of: none, hflip, multiscale, multiscale_hflip. "
            "Did you mean ",
        ),
        (["model.lr=abc"], "model.lr='abc' must be a number."),
        (["seed=1.5"], "seed=1.5 must be a whole number."),
        (["model.residual=maybe"], "model.residual='maybe' must be true or false."),
        (["model=baseline", "model.features=[hog,sift]"], "model.features[1]='sift' is not one"),
        (["trainer.keep=null"], "trainer.keep=null: a value is required"),
        (["model.fliters=[8]"], "model.fliters: no such config key in model. Did you mean "),
        (["+model.fliters=[8]"], "model.fliters=[8]: no such config key in model. Did you mean "),
        (["+foo=1"], "foo=1: no such config key at the top level."),
        (["+data.auth={token:hunter2}"], "data.auth=***: no such config key in data."),
        (
            ["registry.enabled=true", "registry.name=gear/v2"],
            "registry.name='gear/v2' is not a model name MLflow accepts",
        ),
        (["registry.enabled=true", "registry.name="], "registry.name='' is not a model name"),
        (["data.kind=folder"], "data.kind=folder does not choose a data set. Choose the data "),
        (["data.val_fraction=0"], "data.val_fraction=0 leaves nothing to validate on: use e.g."),
    ],
)
def test_a_wrong_type_choice_or_key_is_one_line_naming_key_and_value(overrides, says):
    with pytest.raises(EquipError) as e, config_errors():
        check_config(make_cfg(*overrides))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_the_data_sets_base_is_not_a_data_set():
    with pytest.raises(EquipError, match="^data.kind is unset: data=common is what the data sets"):
        check_config(make_cfg("data=common", tiny=False))


def test_keys_of_your_own_go_under_notes():
    cfg = make_cfg("+notes.ticket=ENG-12", "+notes.owner={team:vision}")
    check_config(cfg)
    assert cfg.notes.owner.team == "vision"


def test_choices_read_as_plain_strings():
    cfg = make_cfg("model.pool=avg")
    assert cfg.model.pool == "avg" and f"{cfg.model.pool}" == "avg" and cfg.model.pool is Pool.avg
    plain = OmegaConf.to_container(cfg.model, enum_to_str=True)
    assert type(plain["activation"]) is str and plain["activation"] == Activation.relu


def test_every_yaml_file_builds_on_a_schema():
    """A group file that skipped its schema would compose untyped and silently accept anything."""
    for path in Path(CONF).glob("*/*.yaml"):
        if path.parent.name in ("experiment", "sweep", "hydra", "launch"):
            continue
        cfg = make_cfg(f"{path.parent.name}={path.stem}", tiny=False)
        assert OmegaConf.get_type(cfg[path.parent.name]) is not dict, path
