from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import pytest

from rnnkit.config import apply_overrides, dump_toml, from_dict, load_config, load_toml, parse_toml, to_dict
from rnnkit.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@dataclasses.dataclass
class ModelCfg:
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    hidden_size: int = 64
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int | None = None

    def validate(self) -> None:
        if self.hidden_size <= 0:
            raise ConfigError(f"hidden_size must be positive, got {self.hidden_size}")


@dataclasses.dataclass
class OptimCfg:
    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: list[int] = dataclasses.field(default_factory=lambda: [10, 20])


@dataclasses.dataclass
class Cfg:
    seed: int
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    optim: OptimCfg = dataclasses.field(default_factory=OptimCfg)
    out_dir: Path = Path("runs")
    tag: str | None = None


def test_from_dict_builds_nested_and_converts_types():
    cfg = from_dict(Cfg, {"seed": 1, "model": {"cell": "gru", "dropout": 1}, "optim": {"betas": [0.8, 0.9]}})
    assert cfg.model == ModelCfg(cell="gru", dropout=1.0)
    assert isinstance(cfg.model.dropout, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.out_dir == Path("runs")


def test_unknown_key_names_section_valid_keys_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, {"seed": 1, "model": {"hiden_size": 3}})
    msg = str(e.value)
    assert "'hiden_size'" in msg and "[model]" in msg
    assert "did you mean 'hidden_size'" in msg
    assert "bidirectional, cell, dropout, hidden_size, proj_size" in msg
    with pytest.raises(ConfigError, match="unknown key 'sed' in the top level; did you mean 'seed'"):
        from_dict(Cfg, {"sed": 1})


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'seed'"):
        from_dict(Cfg, {})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"seed": "1"}, "seed: expected int, got '1' (str)"),
        ({"seed": True}, "seed: expected int, got True (bool)"),
        ({"seed": 1.5}, "seed: expected int, got 1.5 (float)"),
        ({"seed": 1, "model": {"dropout": "0.1"}}, "model.dropout: expected float, got '0.1'"),
        ({"seed": 1, "model": {"bidirectional": 1}}, "model.bidirectional: expected bool, got 1"),
        ({"seed": 1, "model": {"proj_size": "x"}}, "model.proj_size: expected int or None, got 'x'"),
        ({"seed": 1, "model": 3}, "model: expected a table (ModelCfg), got 3"),
        ({"seed": 1, "optim": {"betas": [0.9]}}, "optim.betas: expected a list of 2 values"),
        ({"seed": 1, "optim": {"milestones": [1, "2"]}}, "optim.milestones[1]: expected int, got '2'"),
    ],
)
def test_wrong_types_name_dotted_key_value_and_expected_type(data, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, data)
    assert fragment in str(e.value)


def test_literal_choices():
    expected = r"model.cell: expected one of 'lstm', 'gru', 'rnn', got 'transformer'"
    with pytest.raises(ConfigError, match=expected):
        from_dict(Cfg, {"seed": 0, "model": {"cell": "transformer"}})


def test_validate_hook_runs_after_construction():
    with pytest.raises(ConfigError, match=r"\[model\] hidden_size must be positive, got -3"):
        from_dict(Cfg, {"seed": 0, "model": {"hidden_size": -3}})
    with pytest.raises(ConfigError, match="hidden_size must be positive"):
        apply_overrides(Cfg(seed=0), ["model.hidden_size=0"])


def test_overrides_nested_keys_parse_by_field_type():
    base = Cfg(seed=0)
    cfg = apply_overrides(
        base,
        [
            "seed=7",
            "model.cell=gru",
            "model.dropout=0.25",
            "model.bidirectional=yes",
            "model.proj_size=16",
            "optim.name='sgd'",
            "optim.betas=0.5,0.6",
            "optim.milestones=[1, 2, 3]",
            "out_dir=/tmp/x",
            "tag=a=b",
        ],
    )
    assert cfg.seed == 7 and cfg.model.cell == "gru" and cfg.model.dropout == 0.25
    assert cfg.model.bidirectional is True and cfg.model.proj_size == 16
    assert cfg.optim == OptimCfg(name="sgd", betas=(0.5, 0.6), milestones=[1, 2, 3])
    assert cfg.out_dir == Path("/tmp/x") and cfg.tag == "a=b"
    assert base == Cfg(seed=0), "overrides must not mutate the original"
    for text, expected in [("true", True), ("1", True), ("No", False), ("0", False), ("off", False)]:
        assert apply_overrides(base, [f"model.bidirectional={text}"]).model.bidirectional is expected
    assert apply_overrides(cfg, ["model.proj_size=none"]).model.proj_size is None


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("model.hidden_size", "malformed override 'model.hidden_size': write it as section.key=value"),
        ("=3", "malformed override"),
        ("model.hiden_size=3", "unknown key 'hiden_size' in [model]; did you mean 'hidden_size'"),
        ("modle.cell=gru", "unknown key 'modle' in the top level; did you mean 'model'"),
        ("model=3", "model is a section; set its keys as model.KEY=VALUE"),
        ("seed.x=3", "seed is a value, not a section"),
        ("seed=seven", "seed: expected int, got 'seven'"),
        ("model.bidirectional=maybe", "model.bidirectional: expected bool (true/false, yes/no, 1/0)"),
        ("model.cell=transformer", "model.cell: expected one of 'lstm', 'gru', 'rnn'"),
        ("optim.betas=1,2,3", "optim.betas: expected a list of 2 values"),
    ],
)
def test_bad_overrides(item, fragment):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Cfg(seed=0), [item])
    assert fragment in str(e.value)


def test_toml_round_trip(tmp_path):
    cfg = Cfg(
        seed=3,
        model=ModelCfg(cell="rnn", hidden_size=5, dropout=0.1 + 0.2, bidirectional=True),
        optim=OptimCfg(name='we"ird\\name\n\ttab', lr=1e-20, betas=(0.5, float("inf")), milestones=[]),
        tag="ünïcode",
    )
    text = dump_toml(cfg)
    assert text.startswith('unset = ["model.proj_size"]\n')  # TOML has no null: None keys are listed
    data = tomllib.loads(text)
    assert data.pop("unset") == ["model.proj_size"]
    expected = to_dict(cfg)
    expected["model"].pop("proj_size")
    expected["optim"]["betas"] = list(expected["optim"]["betas"])
    expected["out_dir"] = "runs"
    assert data == expected

    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    assert from_dict(Cfg, load_toml(path)) == cfg
    assert load_toml(path)["model"]["proj_size"] is None
    assert load_config(Cfg, path, ["model.hidden_size=9"]).model.hidden_size == 9


def test_dump_toml_plain_dicts():
    data = {"a": 1, "b": {"c": [1, 2.5, "x"], "nested": {"d": False, "e": None}, "empty": {}}}
    data["odd key"] = math.nan
    back = tomllib.loads(dump_toml(data))
    assert back["unset"] == ["b.nested.e"]
    assert back["a"] == 1 and back["b"]["c"] == [1, 2.5, "x"] and back["b"]["nested"] == {"d": False}
    assert back["b"]["empty"] == {} and math.isnan(back["odd key"])
    with pytest.raises(ConfigError, match="cannot write a value of type object"):
        dump_toml({"x": object()})


def test_load_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_toml(bad)
    for text, says in (('unset = "a"', "unset must be a list of dotted keys"),
                       ('unset = ["a.b"]\na = 1', "names 'a.b', but a is not a table")):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=says):
            load_toml(bad)


def test_a_value_written_into_a_dumped_file_wins_over_its_unset_list(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('unset = ["b", "c"]\nb = 2\n', encoding="utf-8")  # b edited in by hand, as the README says
    assert load_toml(path) == {"b": 2, "c": None}


def test_a_run_config_set_to_none_where_its_recipe_is_not_round_trips():
    from rnnkit.recipes import recipe_config

    cfg = apply_overrides(recipe_config("seed003"), ["train.eval_every=none", "train.epochs=none", "train.steps=7"])
    assert recipe_config("seed003").train.eval_every is not None  # else the test shows nothing
    back = recipe_config("seed003", parse_toml(dump_toml(cfg)))
    assert back == cfg


def test_a_partial_config_file_layers_over_the_recipe_it_names(tmp_path, monkeypatch):
    from cli_runner import run

    from rnnkit import app
    from rnnkit.recipes import recipe_config

    class Stop(Exception):
        pass

    got = []
    monkeypatch.setattr(app, "train", lambda cfg, **kw: got.append(cfg) or (_ for _ in ()).throw(Stop()))
    path = tmp_path / "mine.toml"
    path.write_text('recipe = "seed002"\n[train]\nseed = 1\n', encoding="utf-8")
    with pytest.raises(Stop):
        run(["train", "--config", str(path)])
    assert got == [apply_overrides(recipe_config("seed002"), ["train.seed=1"])]  # not the bare defaults
    path.write_text('recipe = "no-such-recipe"\n', encoding="utf-8")
    code, out, err = run(["train", "--config", str(path)])
    assert code == 2 and "unknown recipe 'no-such-recipe'" in err and len(err.strip().splitlines()) == 1
    # a whole dump stands alone: an older one without the unset list, and a recipe that is only a label
    whole = to_dict(apply_overrides(recipe_config("mnist-rows"), ["train.eval_every=none", 'recipe="mine"']))
    path.write_text(dump_toml(whole).split("\n", 1)[1], encoding="utf-8")  # without its unset line
    with pytest.raises(Stop):
        run(["train", "--config", str(path)])
    assert got[-1].train.eval_every is None and got[-1].recipe == "mine"


def test_a_quoted_none_is_a_name_and_a_bare_one_unsets():
    from rnnkit.recipes import recipe_config

    cfg = recipe_config("mnist-rows")
    assert apply_overrides(cfg, ['data.data_dir="none"']).data.data_dir == "none"
    assert apply_overrides(cfg, ["data.data_dir=none"]).data.data_dir is None
    assert apply_overrides(cfg, ['data.data_dir=""']).data.data_dir is None
