"""The strict checkpoint name grammar (DESIGN.md section 2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptkeeper.names import Kind, ParsedName, old_name, parse_name, step_name, tmp_name


@pytest.mark.parametrize(
    ("name", "kind", "step"),
    [
        ("step_0", Kind.STEP, 0),
        ("step_1", Kind.STEP, 1),
        ("step_10", Kind.STEP, 10),
        ("step_123456789012345678901234567890", Kind.STEP, 123456789012345678901234567890),
        ("tmp_step_0", Kind.TMP, 0),
        ("tmp_step_42", Kind.TMP, 42),
        ("old_step_7", Kind.OLD, 7),
        ("old_step_100", Kind.OLD, 100),
    ],
)
def test_checkpoint_names_are_accepted_with_kind_and_step(name: str, kind: Kind, step: int) -> None:
    parsed = parse_name(name)
    assert parsed == ParsedName(kind, step, name)
    assert parsed is not None and parsed.canonical


@pytest.mark.parametrize(
    "name",
    [
        "step_1-hf",
        "step_x",
        "step_-1",
        "step_+1",
        "step_1.bak",
        "step_1e3",
        "step_1_1",
        "step_",
        "step",
        "step1",
        "Step_1",
        "STEP_1",
        " step_1",
        "step_1 ",
        "step_1\n",
        "\nstep_1",
        "step_1\x00",
        "step_\u0661",  # ARABIC-INDIC DIGIT ONE
        "step_\u0967",  # DEVANAGARI DIGIT ONE
        "step_\uff11",  # FULLWIDTH DIGIT ONE
        "step_1\u0661",
        "step_\U0001d7cf",  # MATHEMATICAL BOLD DIGIT ONE
        "tmp_step_1-hf",
        "tmp_step_",
        "tmp_step_x",
        "old_step_1.bak",
        "old_step_",
        "tmpstep_1",
        "tmp_1",
        "old_1",
        "x_step_1",
        "step_1/",
        "./step_1",
        "",
        "training_info.json",
        ".ckptkeeper",
    ],
)
def test_non_checkpoint_names_are_rejected(name: str) -> None:
    assert parse_name(name) is None


@pytest.mark.parametrize(
    ("name", "kind", "step"),
    [
        ("step_07", Kind.STEP, 7),
        ("step_00", Kind.STEP, 0),
        ("tmp_step_0010", Kind.TMP, 10),
        ("old_step_01", Kind.OLD, 1),
    ],
)
def test_leading_zeros_parse_but_are_not_canonical(name: str, kind: Kind, step: int) -> None:
    parsed = parse_name(name)
    assert parsed is not None
    assert (parsed.kind, parsed.step, parsed.name) == (kind, step, name)
    assert parsed.canonical is False


@pytest.mark.parametrize(
    ("make", "prefix"), [(step_name, "step_"), (tmp_name, "tmp_step_"), (old_name, "old_step_")]
)
def test_name_builders_format_canonical_names(make: object, prefix: str) -> None:
    assert callable(make)
    assert make(0) == f"{prefix}0"
    assert make(12) == f"{prefix}12"
    with pytest.raises(ValueError, match=">= 0"):
        make(-1)


@given(st.integers(min_value=0, max_value=10**30), st.sampled_from(list(Kind)))
def test_built_names_round_trip_through_the_parser(step: int, kind: Kind) -> None:
    make = {Kind.STEP: step_name, Kind.TMP: tmp_name, Kind.OLD: old_name}[kind]
    parsed = parse_name(make(step))
    assert parsed is not None
    assert (parsed.kind, parsed.step, parsed.canonical) == (kind, step, True)


@given(st.text(max_size=40))
def test_parser_never_raises_and_accepts_only_the_ascii_grammar(name: str) -> None:
    parsed = parse_name(name)
    if parsed is None:
        return
    prefix = {Kind.STEP: "step_", Kind.TMP: "tmp_step_", Kind.OLD: "old_step_"}[parsed.kind]
    digits = name[len(prefix) :]
    assert name.startswith(prefix)
    assert digits and all(c in "0123456789" for c in digits)
    assert parsed.step == int(digits)


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_any_ascii_digit_string_is_a_step(digits: str) -> None:
    parsed = parse_name(f"step_{digits}")
    assert parsed is not None
    assert parsed.step == int(digits)
    assert parsed.canonical == (str(int(digits)) == digits)


def test_parser_does_not_raise_for_a_very_long_digit_string() -> None:
    # Not reachable from a directory listing (NAME_MAX is 255 bytes), but parse_name is public
    # and documented to answer None for anything that is not a checkpoint name.
    name = "step_" + "1" * 5000
    parse_name(name)  # must not raise
