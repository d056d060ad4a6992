"""The shared spec grammar: splitting, quoting, lists, typed parameters with bounds, canonical round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lctx import spec
from lctx.spec import Param, SpecError, Tokens


def test_split_keeps_brackets_and_quotes_together() -> None:
    assert spec.split_list("ppl,passkey:depths=[0,0.5,1],niah") == ["ppl", "passkey:depths=[0,0.5,1]", "niah"]
    assert spec.split_list(['niah:needle="a, b: {value}"', "ppl"]) == ['niah:needle="a, b: {value}"', "ppl"]
    with pytest.raises(SpecError, match="unterminated quote"):
        spec.split_list('niah:needle="open')


def test_parse_names_families_and_params() -> None:
    parsed = spec.parse("synthetic:niah-multikey:keys=4:haystack=noise")
    assert parsed.name == "synthetic:niah-multikey"
    assert parsed.params == (("keys", "4"), ("haystack", "noise"))
    assert spec.parse('niah:needle="x: \\"{value}\\""').params == (("needle", 'x: "{value}"'),)
    for bad, words in [("a:k=1:k=2", "given twice"), ("=3", "not key=value"), ("k=3", "no name"),
                       ("a:k=1:b", "not key=value"), ("", "empty spec"), ("a:=3", "not key=value")]:
        with pytest.raises(SpecError, match=words):
            spec.parse(bad)


@pytest.mark.parametrize("param, raw, value", [
    (Param("n", int, ge=1), "3", 3),
    (Param("n", int, ge=1), 3, 3),
    (Param("x", float, gt=0), "0.5", 0.5),
    (Param("x", float, gt=0), 2, 2.0),
    (Param("b", bool), "yes", True),
    (Param("b", bool), False, False),
    (Param("t", Tokens), "1.5k", 1536),
    (Param("d", list[float], ge=0, le=1), "[0,0.5,1]", [0.0, 0.5, 1.0]),
    (Param("d", list[float], ge=0, le=1), "0.25", [0.25]),
    (Param("d", list[float], ge=0, le=1), [0, 1], [0.0, 1.0]),
    (Param("h", str, choices=("corpus", "noise")), "noise", "noise"),
])
def test_convert(param: Param, raw, value) -> None:
    assert param.convert(raw, "task") == value


@pytest.mark.parametrize("param, raw, words", [
    (Param("n", int, ge=1), "0", "n=0 is not valid: n (int ≥ 1"),
    (Param("n", int, ge=1), "2.5", "n=2.5 is not valid"),
    (Param("n", int, ge=1), True, "n=true is not valid"),
    (Param("x", float, gt=0), "nan", "x=nan is not valid: x (float > 0"),
    (Param("x", float, gt=0), "inf", "x=inf is not valid"),
    (Param("d", list[float], ge=0, le=1), "[0,2]", "d=[0,2] is not valid: d (list of float ≥ 0 and ≤ 1"),
    (Param("d", list[float], ge=0, le=1), "[]", "empty list"),
    (Param("h", str, choices=("corpus", "noise")), "nois", "h=nois is not valid: h (text one of corpus, noise"),
    (Param("h", str), 3, "h=3 is not valid"),
])
def test_convert_rejects_with_the_valid_values(param: Param, raw, words: str) -> None:
    with pytest.raises(SpecError) as error:
        param.convert(raw, "task")
    assert str(error.value).startswith("task: ") and words in str(error.value)


def test_unknown_keys_name_the_valid_ones() -> None:
    declared = (Param("haystack", str, "corpus", choices=("corpus", "noise")), Param("keys", int, 1, ge=1))
    with pytest.raises(SpecError, match="unknown parameter 'haystak'. Parameters: haystack .*, keys"):
        spec.convert_all("synthetic:niah", declared, [("haystak", "noise")])


values = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=12), st.lists(st.floats(0, 1), min_size=1, max_size=4))


def _type(value):
    return list[float] if isinstance(value, list) else type(value)


@given(st.lists(st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), values), unique_by=lambda kv: kv[0],
                max_size=4))
def test_canonical_round_trips(items: list) -> None:
    """Whatever the values (quotes, colons, commas, brackets in text), the canonical form parses back to them."""
    declared = {key: Param(key, _type(value)) for key, value in items}
    parsed = spec.parse(spec.canonical("fam:member", items))
    assert parsed.name == "fam:member"
    assert [(key, declared[key].convert(raw, "t")) for key, raw in parsed.params] == [tuple(kv) for kv in items]
    assert spec.split_list(spec.canonical("a", items) + "," + spec.canonical("b", items))[1].startswith("b")


def test_lengths() -> None:
    assert spec.parse_lengths("4k,1.5k,4096,100") == [100, 1536, 4096]
    assert [spec.format_length(n) for n in (4096, 1536, 1000)] == ["4k", "1.5k", "1000"]
    for bad in ("4q", "1.0001k", "1"):
        with pytest.raises(ValueError):
            spec.parse_length(bad)
