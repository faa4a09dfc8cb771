"""`python -m jaxsparse.tune`: measuring crossovers, the cache file, and the rule reading it."""

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jaxsparse as jsp
from jaxsparse import tune
from jaxsparse.ops import dispatch


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "crossovers.json"
    monkeypatch.setenv("JAXSPARSE_CROSSOVERS", str(path))
    return path


def _ms(sparse, engine, dense):
    return {"sparse": sparse, "engine": engine, "dense": dense}


def test_crossover_is_the_last_count_of_an_unbroken_sparse_lead():
    medians = {1: _ms(1, 2, 3), 16: _ms(1, 2, 3), 32: _ms(3, 2, 4), 64: _ms(1, 2, 3)}
    assert tune.crossover(medians) == (16, True)  # 64 comes after a loss: not counted.
    assert tune.crossover({1: _ms(1, 2, 3), 8: _ms(1, 2, 3)}) == (math.inf, False)
    assert tune.crossover({1: _ms(5, 2, 3), 8: _ms(5, 4, 3)}) == (0, False)  # Dense past 0.
    no_engine = {1: {"sparse": 1, "dense": 2}, 8: {"sparse": 3, "dense": 2}}
    assert tune.crossover(no_engine) == (1, False)


def test_tune_measures_a_well_formed_entry():
    lines = []
    entry = tune.tune(["f32", "bf16"], [jsp.NM(1, 4), jsp.NM(2, 4), jsp.NM(2, 8)], (64, 48),
                      [1, 40], repeats=1, log=lines.append)
    assert set(entry["rows"]) == {"float32", "bfloat16"}
    for table in entry["rows"].values():
        assert [b for b, _ in table] == [0.25, 0.25, 1.0]
        assert all(t is None or t in (0, 1, 40) for _, t in table)
    assert set(entry["engine"]) <= {"float32", "bfloat16"}
    assert len(lines) == 2 * 3 * 2 and set(entry["measured"]["float32 2:4"]["40"]) == {
        "sparse", "engine", "dense"}
    assert set(entry["measured"]["float32 2:8"]["40"]) == {"sparse", "dense"}  # No engine.


def test_the_rule_reads_this_machine_s_entry(cache):
    isa = jsp.cpu_isa()
    entry = {"rows": {"bfloat16": [[0.25, None], [1.0, 7]]}, "engine": ["bfloat16"]}
    tune.write_entry(cache, dispatch.machine_key(isa), entry, {"jax": "x"})
    tune.write_entry(cache, "another CPU | avx2", {"rows": {}, "engine": []}, {})
    data = json.loads(cache.read_text())
    assert set(data["machines"]) == {dispatch.machine_key(isa), "another CPU | avx2"}
    rule = lambda t, spec, dtype=jnp.bfloat16: jsp.choose_path(t, dtype, spec, platform="cpu")
    assert rule(7, jsp.NM(2, 4)) == "sparse"
    assert rule(8, jsp.NM(2, 4)) == "engine"
    assert rule(10**6, jsp.NM(1, 4)) == "sparse"  # density 1/4: always sparse in this entry
    # The entry stands for the patterns the tuner measures (1:4 and 2:4); others keep the
    # built-in N:M rows.
    builtin = (dispatch.SPARSE_MAX_TOKENS.get((isa, "bfloat16"))
               or dispatch.SPARSE_MAX_TOKENS[("avx512", "bfloat16")])
    for spec, tokens in ((jsp.NM(2, 8), 10**6), (jsp.NM(4, 8), 8), (jsp.NM(4, 8), 4096)):
        assert rule(tokens, spec) == dispatch._pick(builtin, tokens, spec.density, False)
    # A dtype the entry does not hold keeps the built-in row; V:N:M keeps its own table.
    with_builtin = jsp.choose_path(4096, jnp.float32, 0.5, platform="cpu")
    assert with_builtin == dispatch._pick(
        dispatch.SPARSE_MAX_TOKENS.get((isa, "float32"))
        or dispatch.SPARSE_MAX_TOKENS[("avx512", "float32")], 4096, 0.5,
        (isa, "float32") in dispatch.ENGINE_ROWS)
    assert rule(4096, jsp.VNM(64, 2, 8)) == "sparse"


def test_builtin_ignores_the_file(cache, monkeypatch):
    entry = {"rows": {"float32": [[1.0, 0]]}, "engine": []}
    tune.write_entry(cache, dispatch.machine_key(jsp.cpu_isa()), entry, {})
    assert jsp.choose_path(1, jnp.float32, jsp.NM(2, 4), platform="cpu") == "dense"
    monkeypatch.setenv("JAXSPARSE_CROSSOVERS", "builtin")
    assert dispatch.crossovers_file() is None
    assert jsp.choose_path(1, jnp.float32, jsp.NM(2, 4), platform="cpu") == "sparse"


@pytest.mark.parametrize("text,match", [
    ("not json", "ignoring the tuned crossovers"),
    ('{"version": 99, "machines": {}}', "version 99, expected 1"),
    ('{"version": 1, "machines": {"%s": {"rows": {"float32": [[1.0, 5], [0.25, 1]]}, '
     '"engine": []}}}', "not ascending density bounds"),
    ('{"version": 1, "machines": {"%s": {"rows": {"float32": [[0.5, 5]]}, "engine": []}}}',
     "up to 1"),
    ('{"version": 1}', "machines"),
])
def test_a_damaged_file_warns_and_the_builtin_table_applies(cache, text, match):
    cache.parent.mkdir(parents=True)
    cache.write_text(text.replace("%s", dispatch.machine_key(jsp.cpu_isa())))
    with pytest.warns(UserWarning, match=match):
        got = jsp.choose_path(1, jnp.float32, jsp.NM(2, 4), platform="cpu")
    assert got == "sparse"


def test_command_line_dry_run_and_write(cache):
    run = [sys.executable, "-m", "jaxsparse.tune", "--dtypes", "f32", "--specs", "2:4",
           "--shape", "32x16", "--tokens", "1,33", "--repeats", "1"]
    env_run = lambda extra: subprocess.run(run + extra, capture_output=True, text=True,
                                           env={**__import__("os").environ}, timeout=300)
    dry = env_run(["--dry-run"])
    assert dry.returncode == 0, dry.stderr
    assert "float32: density <= 1" in dry.stdout and not cache.exists()
    wrote = env_run([])
    assert wrote.returncode == 0, wrote.stderr
    entry = json.loads(cache.read_text())["machines"][dispatch.machine_key(jsp.cpu_isa())]
    assert entry["shape"] == [32, 16] and "float32" in entry["rows"]


@pytest.mark.parametrize("argv,match", [
    (["--dtypes", "f64"], "--dtypes: expected one of f32, bf16, f16; got 'f64'"),
    (["--specs", "2:3:4"], "--specs: expected N:M specs"),
    (["--tokens", "0"], "--tokens: expected positive integers; got '0'"),
    (["--shape", "12"], "--shape: expected positive integers"),
])
def test_command_line_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        tune.parse_args(argv)
