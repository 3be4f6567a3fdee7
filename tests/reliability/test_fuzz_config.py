"""Bad input, fuzzed: the ``--set`` / ``--params`` parsers (the VOC and COCO readers:
:mod:`tests.reliability.test_fuzz_inputs`).

Fault: malformed, oversized and hostile YAML and override strings (non-UTF-8 bytes, deeply nested
or huge values, NaN / inf / negative / astronomically large numbers, unknown keys). Must
survive: every case ends in a :class:`~pipeline.errors.ConfigError` naming the key, or a config
that works, never another exception and never a hang (each case is timed).

Each test counts its examples in :data:`tests.support.fuzz.FUZZ_CASES`.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import Config, ConfigError, load_config, parse_override
from tests.support.fuzz import CASE_SECONDS, FUZZ, FUZZ_CASES, FUZZ_OUTCOMES

# --------------------------------------------------------------------------------------------
# --set and --params


KEYS = sorted(Config().flat()) + ["sweep.space.train.lr", "sweep.space.anchors.scales",
                                  "sweep.space.nope.x", "train", "train.", ".lr", "x.y.z",
                                  "train.lr.extra", "tracking.uri", "data.__class__"]
YAML_VALUES = st.one_of(
    st.sampled_from(["!!python/object/apply:os.system ['echo pwned']",
                     "!!binary AAAA", "&a [*a]", "*undefined", "1e999", "-.inf", ".nan",
                     "1" + "0" * 400, "1" + "0" * 5000, "-" + "9" * 300, "{choice: []}",
                     "{choice: [[1], [2]]}", "{uniform: [1]}", "{uniform: [0.9, 0.1]}", "~",
                     "null", "yes", "2020-01-01", "0x1F", "0o17", "\udcff\udcfe",
                     "a: b: c", "- - -", "'unterminated", "\t", "\x00", "\x85\u2028"]),
    st.text(max_size=60),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                 lambda children: st.one_of(st.lists(children, max_size=3),
                                            st.dictionaries(st.text(max_size=5), children,
                                                            max_size=3)),
                 max_leaves=10).map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))


def _load_or_refuse(params, overrides) -> None:
    start = time.monotonic()
    try:
        cfg = load_config(params, overrides)
    except ConfigError as exc:
        assert str(exc)
        FUZZ_OUTCOMES["config ConfigError"] += 1
    else:
        FUZZ_OUTCOMES["config accepted"] += 1
        assert isinstance(cfg, Config)
        cfg.flat()  # what every stage logs to MLflow: must work for any accepted config
    assert time.monotonic() - start < CASE_SECONDS


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=600)
@given(items=st.lists(st.one_of(
    st.text(max_size=80),
    st.tuples(st.sampled_from(KEYS), YAML_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}")),
    min_size=1, max_size=3))
def test_set_overrides_end_in_a_config_or_a_config_error(items):
    FUZZ_CASES["--set"] += 1
    for item in items:
        try:
            key, _ = parse_override(item)
        except ConfigError as exc:
            assert item[:20] in str(exc) or "--set" in str(exc)
        else:
            assert isinstance(key, str)
    _load_or_refuse([], items)


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=300)
@given(content=st.one_of(
    st.binary(max_size=500),
    st.sampled_from([b"\xff\xfe\x00t\x00r", b"train:\n  lr: \xff\n",
                     b"train: !!python/object/apply:os.system ['echo pwned']",
                     b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c]\n"
                     b"data: {classes: *d}\nsweep: {space: {data.classes: {choice: *d}}}\n",
                     b"train:\n  batch_size: 1" + b"0" * 5000 + b"\n",
                     b"train:\n  lr: 1" + b"0" * 400 + b"\n", b"train:\n  seed: 1" + b"0" * 30,
                     b"--- \n...\n---\n", b"train: [1, 2]", b"1: {2: 3}", b"train: {1: 2}"]),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                 lambda children: st.dictionaries(
                     st.one_of(st.sampled_from(["data", "train", "lr", "space", "sweep",
                                                "batch_size", "classes"]), st.text(max_size=4)),
                     children, max_size=3), max_leaves=12).map(
        lambda v: yaml.safe_dump(v).encode("utf-8", errors="surrogatepass"))))
def test_params_files_end_in_a_config_or_a_config_error(content):
    FUZZ_CASES["--params"] += 1
    with tempfile.TemporaryDirectory(prefix="fuzz-params-") as folder:
        path = Path(folder) / "params.yaml"
        path.write_bytes(content)
        _load_or_refuse([path], [])


# Parsing these takes 0.2-0.6 s each (PyYAML is recursive, in pure Python): tried once each
# here rather than drawn again and again by hypothesis.
DEEP_OR_HUGE = ["[" * 5000, "{" * 5000, "a: " * 3000 + "1", "[" + ", ".join(["1"] * 10000) + "]",
                "x" * 1_000_000]


def test_deeply_nested_or_huge_values_are_refused(tmp_path):
    for value in DEEP_OR_HUGE:
        FUZZ_CASES["--set"] += 1
        _load_or_refuse([], [f"anchors.scales={value}"])
        FUZZ_CASES["--params"] += 1
        path = tmp_path / "params.yaml"
        path.write_text(f"anchors:\n  scales: {value}\n")
        _load_or_refuse([path], [])


def test_accepted_numbers_are_usable():
    """What the parser accepts, the stages can use: no seed torch cannot take, no float that
    overflows (a crash trace later, in a Ray worker, instead of a clear error now)."""
    FUZZ_CASES["--set"] += 4
    for item in ("train.seed=" + "9" * 30, "train.lr=1" + "0" * 400, "train.batch_size=1" + "0" * 5000):
        with pytest.raises(ConfigError, match=item.split("=")[0]):
            load_config([], [item])
    assert math.isfinite(load_config([], ["train.lr=1.0e+300"]).train.lr)
    assert load_config([], ["data.seed=" + "9" * 30]).data.seed == int("9" * 30)  # numpy takes it
