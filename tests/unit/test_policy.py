"""Policy validation, durations and `Policy.from_mapping` (DESIGN.md sections 4 and 5)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ckptkeeper.policy import Policy, PolicyError, format_duration, metric_value, parse_duration

# -- counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keep_top_k", -1),
        ("keep_top_k", True),
        ("keep_top_k", False),
        ("keep_top_k", 2.0),
        ("keep_top_k", 2.5),
        ("keep_top_k", "3"),
        ("keep_latest_n", -1),
        ("keep_latest_n", True),
        ("keep_latest_n", 1.0),
        ("keep_latest_n", "2"),
        ("save_period", 0),
        ("save_period", -2),
        ("save_period", None),
        ("save_period", True),
        ("save_period", 1.0),
        ("save_period", "1"),
        ("keep_every_n_steps", 0),
        ("keep_every_n_steps", -10),
        ("keep_every_n_steps", True),
        ("keep_every_n_steps", 10.0),
        ("keep_every_n_steps", "10"),
        ("higher_is_better", 1),
        ("higher_is_better", "true"),
        ("higher_is_better", None),
        ("keep_latest", 0),
        ("keep_latest", "yes"),
        ("keep_unranked", 1),
        ("metric_name", ""),
        ("metric_name", 5),
        ("metric_name", True),
        ("complete_marker", ""),
        ("complete_marker", "a/b"),
        ("complete_marker", "/abs"),
        ("complete_marker", "."),
        ("complete_marker", ".."),
        ("complete_marker", None),
        ("complete_marker", 3),
        ("stale_after", -1),
        ("stale_after", -0.5),
        ("stale_after", math.inf),
        ("stale_after", math.nan),
        ("stale_after", True),
        ("stale_after", "6h"),  # the dataclass takes seconds; strings go through from_mapping
        ("trash_grace", -1),
        ("trash_grace", math.inf),
        ("trash_grace", None),
    ],
)
def test_invalid_policy_value_raises_policy_error_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(PolicyError) as info:
        Policy(**{key: value})
    assert info.value.key == key
    assert key in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keep_top_k", 0),
        ("keep_top_k", 1),
        ("keep_top_k", 1000),
        ("keep_top_k", None),
        ("keep_latest_n", 0),
        ("keep_latest_n", 3),
        ("save_period", 1),
        ("save_period", 50),
        ("keep_every_n_steps", 1),
        ("keep_every_n_steps", 1000),
        ("metric_name", "val_reward"),
        ("metric_name", "val:loss"),
        ("metric_name", None),
        ("complete_marker", ".complete"),
        ("complete_marker", "DONE"),
        ("complete_marker", "..done"),
        ("stale_after", 0),
        ("stale_after", 1.5),
        ("trash_grace", 0.0),
        ("trash_grace", 86400),
    ],
)
def test_valid_policy_values_are_accepted(key: str, value: Any) -> None:
    assert getattr(Policy(**{key: value}), key) == value


def test_marker_name_with_nul_byte_is_rejected() -> None:
    with pytest.raises(PolicyError) as info:
        Policy(complete_marker="done\x00")
    assert info.value.key == "complete_marker"


@pytest.mark.parametrize("name", ["training_info.json", "config.yaml", "KEEP", ".writer.lock"])
def test_marker_may_not_name_a_file_the_protocol_uses(name: str) -> None:
    # training_info.json is written first: as the marker it would finalize a save just begun.
    with pytest.raises(PolicyError) as info:
        Policy(complete_marker=name)
    assert info.value.key == "complete_marker"
    assert f"{name!r} is a file the checkpoint protocol already uses" in info.value.reason
    with pytest.raises(PolicyError, match=r"^run\.toml: complete_marker: "):
        Policy.from_mapping({"complete_marker": name}, source="run.toml")


def test_policy_defaults_follow_the_design_table() -> None:
    p = Policy()
    assert p.keep_top_k is None
    assert p.metric_name is None
    assert p.higher_is_better is False
    assert p.save_period == 1
    assert p.keep_latest is True
    assert p.keep_latest_n is None
    assert p.keep_every_n_steps is None
    assert p.keep_unranked is False
    assert p.stale_after == 6 * 3600
    assert p.complete_marker == ".complete"
    assert p.trash_grace == 0
    assert p.bounded is False


@pytest.mark.parametrize(
    ("kwargs", "bounded"),
    [
        ({}, False),
        ({"keep_every_n_steps": 10}, False),
        ({"keep_latest": False}, False),
        ({"keep_top_k": 0}, True),
        ({"keep_top_k": 3}, True),
        ({"keep_latest_n": 0}, True),
        ({"keep_latest_n": 2, "keep_top_k": 1}, True),
    ],
)
def test_bounded_only_with_keep_top_k_or_keep_latest_n(
    kwargs: dict[str, Any], bounded: bool
) -> None:
    assert Policy(**kwargs).bounded is bounded


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("0s", 0.0),
        ("10m", 600.0),
        ("6h", 21600.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        (" 10m ", 600.0),
        (0, 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_durations_parse_to_seconds(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "value",
    ["10", "5w", "-1s", "abc", "", "s", "1.s", ".5s", "1e3s", "10 m", "10M", "1h30m", "\u0661s",
     True, False, -1, math.inf, math.nan, None, [1]],
)  # fmt: skip
def test_bad_durations_raise_policy_error_naming_the_key(value: Any) -> None:
    with pytest.raises(PolicyError) as info:
        parse_duration(value, "stale_after")
    assert info.value.key == "stale_after"
    assert "stale_after" in str(info.value)


@pytest.mark.parametrize("seconds", [0.0, 0.5, 30.0, 60.0, 90.0, 3600.0, 5400.0, 86400.0, 172800.0])
def test_format_duration_round_trips_through_parse(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# -- from_mapping -----------------------------------------------------------------------------


def test_from_mapping_parses_duration_strings_and_keeps_other_values() -> None:
    p = Policy.from_mapping(
        {
            "keep_top_k": 3,
            "metric_name": "val_reward",
            "higher_is_better": True,
            "stale_after": "10m",
            "trash_grace": "1d",
            "complete_marker": "DONE",
        }
    )
    assert (p.keep_top_k, p.metric_name, p.higher_is_better) == (3, "val_reward", True)
    assert (p.stale_after, p.trash_grace, p.complete_marker) == (600.0, 86400.0, "DONE")


def test_from_mapping_layers_over_a_base_policy() -> None:
    base = Policy(keep_top_k=5, metric_name="loss", keep_latest_n=2)
    p = Policy.from_mapping({"keep_top_k": 1}, base=base)
    assert (p.keep_top_k, p.metric_name, p.keep_latest_n) == (1, "loss", 2)
    assert base.keep_top_k == 5  # the base is not modified


@pytest.mark.parametrize(
    ("values", "key", "words"),
    [
        ({"keep_top_k": 3, "keep_topk": 2}, "keep_topk", "unknown key"),
        ({"retention": "daemon"}, "retention", "unknown key"),
        ({"keep_top_k": -1}, "keep_top_k", ">= 0"),
        ({"keep_top_k": "3"}, "keep_top_k", "whole number"),
        ({"save_period": 0}, "save_period", ">= 1"),
        ({"keep_every_n_steps": 0}, "keep_every_n_steps", ">= 1"),
        ({"metric_name": ""}, "metric_name", "non-empty"),
        ({"complete_marker": "a/b"}, "complete_marker", "plain file name"),
        ({"stale_after": "10"}, "stale_after", "duration"),
        ({"stale_after": "5w"}, "stale_after", "duration"),
        ({"trash_grace": "-1s"}, "trash_grace", "duration"),
        ({"trash_grace": True}, "trash_grace", "duration"),
        ({"higher_is_better": "yes"}, "higher_is_better", "true or false"),
    ],
)
def test_from_mapping_errors_name_the_key_and_the_source(
    values: dict[str, Any], key: str, words: str
) -> None:
    source = "/lustre/ckpt/run-a/ckptkeeper.toml"
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping(values, source=source)
    err = info.value
    assert err.key == key
    assert err.source == source
    assert source in str(err)
    assert key in str(err)
    assert words in str(err)


def test_unknown_key_error_lists_the_known_keys() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_mapping({"keep_top": 1})
    assert "keep_top_k" in str(info.value)
    assert Policy.keys() >= {"keep_top_k", "metric_name", "stale_after", "trash_grace"}


# -- metric values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"m": 0.5}, 0.5),
        ({"m": 3}, 3.0),
        ({"m": -0.0}, 0.0),
        ({"m": 1e308}, 1e308),
        (None, "metric missing"),
        ({}, "metric missing"),
        ({"other": 1.0}, "metric missing"),
        ({"m": math.nan}, "metric not finite"),
        ({"m": math.inf}, "metric not finite"),
        ({"m": -math.inf}, "metric not finite"),
        ({"m": "0.5"}, "metric not a number (str)"),
        ({"m": True}, "metric not a number (bool)"),
        ({"m": None}, "metric not a number (NoneType)"),
        ({"m": {"value": 1}}, "metric not a number (dict)"),
        ({"m": [1.0]}, "metric not a number (list)"),
    ],
)
def test_metric_value_is_a_float_or_the_reason_it_is_unranked(
    info: dict[str, Any] | None, expected: float | str
) -> None:
    value = metric_value(info, "m")
    if isinstance(expected, str):
        assert isinstance(value, str)
        assert value.startswith(expected)
    else:
        assert value == expected
        assert isinstance(value, float)


def test_metric_value_does_not_raise_for_a_huge_integer() -> None:
    value = metric_value({"m": 10**400}, "m")
    assert isinstance(value, str)  # unranked, with a reason
