"""The core: typed configs (one parser, coercion by type, unknown keys refused) and the registry type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from leaklab.core import Config, NoOptions, Registry, option, parse_pairs, parse_spec
from leaklab.errors import LeaklabError, UnknownNameError


@dataclass(frozen=True)
class Toy(Config):
    beam: int = option(4, "prefixes kept")
    rate: float = option(0.5, "a rate in (0, 1]")
    flag: bool = option(False, "a switch")
    mode: Literal["a", "b"] = option("a", "one of two")
    limit: float | None = option(None, "optional number")
    sizes: tuple[int, ...] = option((1, 2), "comma list")

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise LeaklabError(f"rate must be in (0, 1], got {self.rate}")


def test_parse_pairs_and_spec():
    assert parse_pairs(["beam=4", "budget-s = 120"]) == {"beam": "4", "budget_s": "120"}
    with pytest.raises(LeaklabError, match="not of the form key=value"):
        parse_pairs(["beam"])
    with pytest.raises(LeaklabError, match="given twice"):
        parse_pairs(["beam=1", "beam=2"])
    assert parse_spec("dpsgd:clip=1,epsilon=8") == ("dpsgd", {"clip": "1", "epsilon": "8"})
    assert parse_spec("clip") == ("clip", {})


def test_config_coerces_by_type_and_round_trips():
    cfg = Toy.from_pairs(["beam=8", "rate=0.25", "flag=true", "mode=b", "limit=none", "sizes=3,4,5"])
    assert cfg == Toy(beam=8, rate=0.25, flag=True, mode="b", limit=None, sizes=(3, 4, 5))
    assert Toy.from_dict(cfg.to_dict()) == cfg
    assert Toy.from_pairs(["limit=2.5"]).limit == 2.5
    assert cfg.changed() == {"beam": 8, "rate": 0.25, "flag": True, "mode": "b", "sizes": [3, 4, 5]}


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (["hops=3"], "toy has no option 'hops'; valid: beam, rate, flag, mode, limit, sizes"),
        (["beam=two"], "option 'beam': expected an integer"),
        (["beam=1.5"], "option 'beam': expected an integer"),
        (["flag=maybe"], "expected true or false"),
        (["mode=c"], "'c' is not one of a, b"),
        (["rate=2"], "toy: rate must be in"),
    ],
)
def test_config_bad_values_fail_with_one_line(pairs, match):
    with pytest.raises(LeaklabError, match=match):
        Toy.from_pairs(pairs, owner="toy")


def test_describe_lists_defaults_and_help():
    rows = {r["name"]: r for r in Toy.describe()}
    assert rows["beam"] == {"name": "beam", "type": "int", "default": 4, "help": "prefixes kept"}
    assert rows["mode"]["type"] == "a|b"
    with pytest.raises(LeaklabError, match="has no option 'x'; valid: none"):
        NoOptions.from_dict({"x": 1}, owner="thing")


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry = Registry("widget")
    reg.register("a", object(), config=Toy, help="first", settings=("fedsgd",))
    with pytest.raises(LeaklabError, match="widget 'a' is already registered"):
        reg.register("a", object())

    @reg.register("b", aliases=("b-old",), hidden=False)
    class B:
        """The B widget."""

    with pytest.raises(LeaklabError, match="widget 'b-old' is already registered"):
        reg.register("b-old", object())
    assert reg.get("b-old").impl is B and reg.get("b").help == "The B widget."
    assert reg.names() == ["a", "b"] and reg.help_names() == "a or b"
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; valid: a, b"):
        reg.get("c")
    entry = reg.get("a")
    assert entry.options(["beam=2"]) == Toy(beam=2)
    with pytest.raises(LeaklabError, match="widget 'a' has no option 'hops'"):
        entry.options({"hops": 3})


def test_registry_loads_builtins_once_and_lazily():
    calls = []
    reg: Registry = Registry("thing", builtins=lambda: (calls.append(1), reg.register("x", object())))
    assert calls == []
    assert reg.names() == ["x"] and "x" in reg
    assert calls == [1]
