"""Sharded products (jaxsparse/sharding.py): every CPU format partitions under jit with
NamedShardings, data parallel, column parallel and row parallel, without gathering a weight, and
so do its backward kernels; a data-parallel training step; two processes training data-parallel
equal one. The MARLIN layouts (CUDA) split into exactly the layout of each shard's columns or
inputs, and their sharded products run on the CUDA kernels under the SIMT emulator.

The device count is fixed when jax starts its backend, which this process did already: the
8-device checks run in one subprocess (tests/_sharding_worker.py), whose results the tests read.
"""

import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cpu_only  # The CPU kernels, on 8 forced CPU devices.

FORMATS = ("nm24", "nm24_bf16", "nm28", "vnm", "vnm_tiled", "vnm_tiled_bf16", "blocks",
           "blocks_shards",
           "blocks_rows", "int4", "int4_channel", "int4_lines", "w4a8", "int4_nm", "int4_nm_lines",
           "int4_nm_lines_channel")
# (format, mode) pairs the format's layout cannot split: shard_weight refuses them by name.
REFUSED = {
    ("vnm_tiled_bf16", "row"): r"VNMSparseTiled .* whole runs of 64 in tiles",  # 32 a shard.
    ("blocks", "column"): r"BlocksSparse .* chosen over the whole matrix.*shards=s",
    ("blocks", "row"): r"BlocksSparse .* chosen over the whole matrix.*shards=s, split=\"in\"",
    ("blocks_shards", "row"): r"BlocksSparse .* balance runs of outputs, not of inputs",
    ("blocks_rows", "column"): r"BlocksSparse .* balance runs of inputs, not of outputs",
}
NO_COLLECTIVES = {"all-gather": 0, "all-reduce": 0, "all-to-all": 0, "collective-permute": 0}


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The worker's results, computed once per session: under pytest-xdist the first worker to
    get here runs it (half a minute) and the others read its output from the session's shared
    temporary directory."""
    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # Shared by this session's workers (and only by them).
    results = folder / "sharding_worker.json"
    with open(folder / "sharding_worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.exists():
            run = subprocess.run([sys.executable, "-m", "tests._sharding_worker"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=600, env=_env())
            assert run.returncode == 0, run.stderr[-4000:]
            results.write_text(run.stdout)
    return json.loads(results.read_text())


def _result(sharded, key):
    result = sharded[key]
    assert "exception" not in result, f"{key}:\n{result['exception']}"
    return result


def _unless_refused(sharded, key, name, mode):
    """The check's result; None where the format cannot split in `mode`, which shard_weight must
    then have refused by name."""
    result = _result(sharded, key)
    if (name, mode) not in REFUSED:
        assert "error" not in result, result["error"]
        return result
    assert "error" in result, result
    assert "jaxsparse.shard_weight" in result["error"]
    assert re.search(REFUSED[(name, mode)], result["error"]), result["error"]
    return None


def _tolerance(name):
    return 2 ** -7 if name.endswith("bf16") else 1e-5  # bf16: the row shards round per shard.


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("mode", ("data", "column", "row"))
def test_sharded_product_equals_one_device_and_gathers_no_weight(sharded, name, mode):
    result = _unless_refused(sharded, f"{name}/{mode}", name, mode)
    if result is None:
        return
    assert result["err"] <= _tolerance(name) * max(result["scale"], 1.0), result
    want_spec = {"data": ["d"], "column": [None, "d"], "row": []}[mode]
    assert result["spec"] == want_spec
    # No gather of anything (weights included); the row shards' partial products are summed.
    want = dict(NO_COLLECTIVES, **({"all-reduce": 1} if mode == "row" else {}))
    assert result["collectives"] == want


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("mode", ("data", "column", "row"))
def test_backward_kernels_run_on_the_shards_and_gather_no_weight(sharded, name, mode):
    result = _unless_refused(sharded, f"{name}/{mode}/backward", name, mode)
    if result is None:
        return
    # x's cotangent, and the weight's where the format trains it (int4 and packed tiles are
    # frozen): equal to one device's.
    assert result["grads"] == (2 if result["weight"] else 1), result
    assert result["weight"] == (not name.startswith(("int4", "w4a8", "vnm_tiled"))), result
    assert result["err"] <= 2 * _tolerance(name) * max(result["scale"], 1.0), result
    assert result["x_spec"] == {"data": ["d"], "column": [], "row": [None, "d"]}[mode]
    # Nothing gathered; a sum where shards hold partial cotangents: the weight's over the token
    # shards (data parallel), x's over the output shards (column parallel).
    sums = {"data": int(result["weight"]), "column": 1, "row": 0}[mode]
    assert result["collectives"] == dict(NO_COLLECTIVES, **{"all-reduce": sums}), result
    # Forward mode partitions as the product does (row parallel: the psum of the shards).
    assert result["jvp_err"] <= _tolerance(name) * max(result["scale"], 1.0), result
    want = dict(NO_COLLECTIVES, **({"all-reduce": 1} if mode == "row" else {}))
    assert result["jvp_collectives"] == want, result


@pytest.mark.parametrize("name", ("nm24", "int4", "vnm_tiled_bf16", "blocks_shards",
                                  "blocks_rows"))
def test_tokens_and_weight_on_a_2d_mesh(sharded, name):
    result = _result(sharded, f"{name}/2d")
    # The 1xN weights are balanced for 8 runs, so for 4 shards, of outputs or of inputs.
    assert ("column" in result) == (name != "blocks_rows")
    assert ("row" in result) == (name != "blocks_shards")
    if "column" in result:
        # Each device multiplies half the tokens (16 of 32) by its outputs: the same sums, bit
        # for bit, except bf16 V:N:M in the AVX-512 units (avx512, avx512bf16, amx), whose
        # kernels sum in an order that depends on the token count (seen on Zen 5: one output
        # one bf16 step apart, 9.5e-7 at a scale of 41; exact on avx2).
        reordered = name.endswith("bf16") and jsp.cpu_isa() in ("avx512", "avx512bf16", "amx")
        limit = _tolerance(name) * result["column"]["scale"] if reordered else 0.0
        assert result["column"]["err"] <= limit, result
        assert result["column"]["spec"] == ["data", "model"]
        assert result["column"]["collectives"] == NO_COLLECTIVES
    if "row" not in result:
        return
    assert result["row"]["err"] <= max(1e-4, _tolerance(name) * result["row"]["scale"])
    assert result["row"]["spec"] == ["data"]
    assert result["row"]["collectives"] == dict(NO_COLLECTIVES, **{"all-reduce": 1})


@pytest.mark.parametrize("name, shape", [("vnm_tiled", [8, 1, 4, 256]),
                                         ("vnm_tiled_bf16", [8, 4, 1, 512])])
def test_a_tiled_weights_row_shards_hold_the_packing_of_their_own_groups(sharded, name, shape):
    result = _result(sharded, f"{name}/row/layout")  # f32 over 8 devices, bf16 over 4.
    assert result["mismatched"] == [] and result["local"] == shape
    assert result["tiles"] == "P(None, None, 'd', None)"


def test_a_split_the_format_cannot_run_falls_back_correctly_and_warns(sharded):
    result = _result(sharded, "blocks/fallback")
    assert result["err"] == 0.0
    assert result["warned"] and "BlocksSparse's values arrives split" in result["warned"][0]


def test_a_layer_of_a_1xn_spec_with_shards_runs_column_parallel(sharded):
    result = _result(sharded, "blocks_shards/layer")  # SparseLinear(sparsity=Blocks(..., 8)).
    assert (result["shards"], result["split"]) == (8, "out")
    assert result["err"] <= 1e-5
    assert result["spec"] == [None, "d"]  # The output stays split by columns, bias added.
    assert result["collectives"] == NO_COLLECTIVES


def test_a_layer_of_a_1xn_spec_split_by_inputs_runs_row_parallel(sharded):
    result = _result(sharded, "blocks_rows/layer")  # Blocks(..., 8, split="in"), x split.
    assert (result["shards"], result["split"]) == (8, "in")
    assert result["err"] <= 1e-5
    assert result["spec"] == []  # The shards' partial products summed, then the bias.
    assert result["collectives"] == dict(NO_COLLECTIVES, **{"all-reduce": 1})


MARLIN = ("int4_marlin", "int4_marlin_g32", "int4_marlin_channel", "int4_nm_marlin",
          "int4_nm_marlin_channel")


@pytest.mark.parametrize("mode", ("column", "row"))
@pytest.mark.parametrize("name", MARLIN)
def test_a_marlin_weights_shards_hold_the_layout_of_their_own_columns_or_inputs(sharded, name,
                                                                               mode):
    result = _result(sharded, f"{name}/{mode}/layout")  # [1024, 512] bf16 over 8 devices.
    assert "error" not in result, result["error"]
    assert result["mismatched"] == []
    axis = "P(None, 'd')" if mode == "column" else "P('d', None)"
    # One scale per column: a row shard holds all of them.
    whole = {"P()"} if mode == "row" and name.endswith("_channel") else set()
    assert set(result["split"]) == {axis} | whole


def test_marlin_products_split_in_every_mode_on_the_emulated_cuda_kernels():
    # Its own process: JAXSPARSE_EMULATE_CUDA=1 lowers every product onto the CUDA kernels.
    run = subprocess.run([sys.executable, "-m", "tests._sharding_worker", "marlin"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**_env(), "JAXSPARSE_EMULATE_CUDA": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout)
    for name in MARLIN:
        for mode in ("data", "column", "row"):
            key = f"{name}/{mode}"
            result = _result(results, key)
            assert "error" not in result, (key, result["error"])
            exact = mode != "row"  # Row shards round their partial products to bf16 first.
            assert result["err"] <= (0.0 if exact else result["scale"] * 2**-7), (key, result)
            assert result["spec"] == {"data": ["d"], "column": [None, "d"], "row": []}[mode]
            assert result["collectives"] == dict(
                NO_COLLECTIVES, **({"all-reduce": 1} if mode == "row" else {})), key
            # x's gradient (the canonical int4 kernel of W^T on each shard): summed over the
            # output shards in column parallel, local in the others; bf16 rounding only.
            assert result["grad_err"] <= result["grad_scale"] * 2**-7, (key, result)
            assert result["grad_collectives"] == dict(
                NO_COLLECTIVES, **({"all-reduce": 1} if mode != "data" else {})), key


@pytest.mark.parametrize("name", ("blocks_shards", "blocks_rows"))
def test_a_1xn_weight_without_the_balance_it_claims_multiplies_to_nan(sharded, name):
    result = _result(sharded, f"{name}/unbalanced")  # Split column- or row-parallel by hand.
    assert not result["balanced_nan"]
    assert result["nan_columns"] == 512, result  # Every output: none silently wrong.


def test_data_parallel_training_step_equals_one_device(sharded):
    result = _result(sharded, "nm24/training")
    assert result["step_err"] <= 1e-6  # shard_map: local kernels, summed gradients.
    assert result["grad_err"] <= 1e-6  # grad of a jit over token-sharded x.
    assert result["split_grad_err"] <= 1e-6  # ... over a column- or row-split weight.


# ---------------------------------------------------------------------- in this process
def test_shard_weight_refuses_bad_arguments():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    ws = jsp.fromdense(jnp.ones((16, 8)), jsp.NM(2, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        jsp.shard_weight(ws, mesh, "diagonal", "d")
    with pytest.raises(ValueError, match="needs axis_name"):
        jsp.shard_weight(ws, mesh, "row")
    three = jax.sharding.Mesh(np.array(jax.devices()[:1] * 3), ("d",))
    with pytest.raises(ValueError, match="in_features=16 is not a multiple of 3"):
        jsp.weight_specs(ws, three, "row", "d")
    # One scale per column: whole on every row shard, except with int8 activations.
    P = jax.sharding.PartitionSpec
    ws = jsp.fromdense(jnp.ones((16, 8)), jsp.Int4(None))
    assert jsp.weight_specs(ws, mesh, "row", "d") == {"qweight": P("d", None), "scales": P()}
    ws = jsp.fromdense(jnp.ones((16, 8)), jsp.Int4(None, activations="int8"))
    with pytest.raises(ValueError, match="one scale per output column .* int8 activations"):
        jsp.weight_specs(ws, mesh, "row", "d")


def test_a_1xn_weight_splits_column_parallel_only_where_built_balanced():
    P = jax.sharding.PartitionSpec
    w = jax.random.normal(jax.random.key(0), (64, 128))
    ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4)
    two, three = (jax.sharding.Mesh(np.array(jax.devices()[:1] * k), ("d",)) for k in (2, 3))
    assert jsp.weight_specs(ws, two, "column", "d") == {
        "values": P("d", None), "indices": P("d"), "indptr": P()}
    with pytest.raises(ValueError, match="out_features=128 is not a multiple of 3"):
        jsp.weight_specs(ws, three, "column", "d")
    eight = jax.sharding.Mesh(np.array(jax.devices()[:1] * 8), ("d",))
    with pytest.raises(ValueError, match="whole runs of 32 in values"):
        jsp.weight_specs(ws, eight, "column", "d")  # Balanced for 4 runs, not for 8.
    with pytest.raises(ValueError, match=r"chosen over the whole matrix.*shards=s"):
        jsp.weight_specs(jsp.fromdense(w, jsp.Blocks(16, 0.25)), two, "column", "d")


def test_a_1xn_weight_split_by_inputs_splits_row_parallel_only():
    P = jax.sharding.PartitionSpec
    w = jax.random.normal(jax.random.key(0), (64, 40))  # out not a multiple of n: no matter.
    ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4, split="in")
    two, three = (jax.sharding.Mesh(np.array(jax.devices()[:1] * k), ("d",)) for k in (2, 3))
    assert jsp.weight_specs(ws, two, "row", "d") == {
        "values": P("d", None), "indices": P("d"), "indptr": P()}
    with pytest.raises(ValueError, match="in_features=64 is not a multiple of 3"):
        jsp.weight_specs(ws, three, "row", "d")
    eight = jax.sharding.Mesh(np.array(jax.devices()[:1] * 8), ("d",))
    with pytest.raises(ValueError, match="whole runs of 16 in values"):
        jsp.weight_specs(ws, eight, "row", "d")  # Balanced for 4 runs, not for 8.
    with pytest.raises(ValueError, match="balance runs of inputs, not of outputs"):
        jsp.weight_specs(ws, two, "column", "d")


def test_weight_specs_name_each_array_split():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 4), ("d",))
    ws = jsp.fromdense(jnp.ones((64, 256)), jsp.VNM(64, 2, 8))
    P = jax.sharding.PartitionSpec
    assert jsp.weight_specs(ws, mesh, "column", "d") == {
        "values": P("d", None), "indices": P("d", None), "columns": P("d", None)}
    assert jsp.weight_specs(ws, mesh, "row", "d") == {
        "values": P(None, "d"), "indices": P(None, "d"), "columns": P(None, "d")}
    with pytest.raises(ValueError, match="whole runs of 64 in columns"):
        jsp.weight_specs(jsp.fromdense(jnp.ones((64, 128)), jsp.VNM(64, 2, 8)), mesh, "column",
                         "d")
    assert jsp.x_spec("data", "d") == P("d", None)
    assert jsp.x_spec("row", "d", ndim=3) == P(None, None, "d")


# ---------------------------------------------------------------------- two processes
TRAIN = textwrap.dedent("""
    import os, sys
    os.environ["JAXSPARSE_CROSSOVERS"] = "builtin"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, nproc, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=nproc, process_id=pid)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxsparse as jsp

    w0 = jsp.fromdense(jax.random.normal(jax.random.key(0), (32, 16)), jsp.NM(2, 4))
    x = jax.random.normal(jax.random.key(1), (16, 32))
    t = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (32, 16)))
    params = {"values": w0.values, "b": jnp.zeros((16,))}

    def loss(params, x, t):  # This process's share of the mean over the whole batch.
        y = jnp.tanh(x @ w0.replace(values=params["values"]) + params["b"])
        return jnp.sum((y - t) ** 2) / (16 * 16)  # Not t.size: t is the local rows.

    mesh = Mesh(np.array(jax.devices()), ("d",))
    step = jax.jit(jax.shard_map(
        lambda p, x, t: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p, x, t)),
        mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P()))
    rows = NamedSharding(mesh, P("d"))
    lo, hi = pid * 16 // nproc, (pid + 1) * 16 // nproc  # This process's tokens.
    xs = jax.make_array_from_process_local_data(rows, np.asarray(x[lo:hi]), (16, 32))
    ts = jax.make_array_from_process_local_data(rows, np.asarray(t[lo:hi]), (16, 16))
    for _ in range(5):
        params = step(params, xs, ts)
    np.savez(out, **{k: np.asarray(jax.device_get(v)) for k, v in params.items()})
    if nproc > 1:
        jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_data_parallel_like_one(tmp_path):
    """2 processes on localhost (jax.distributed, gloo CPU collectives), one CPU device each,
    train data-parallel; a third process trains on the whole batch alone."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    port = _free_port()
    runs = [("p0", 0, 2), ("p1", 1, 2), ("one", 0, 1)]
    procs = []
    for name, pid, nproc in runs:
        with open(tmp_path / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(port), str(pid), str(nproc),
                 str(tmp_path / f"{name}.npz")], cwd=ROOT, env=_env(),
                stdout=subprocess.DEVNULL, stderr=log))
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (name, _, _), code in zip(runs, codes):
        assert code == 0, f"{name}: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
    want = np.load(tmp_path / "one.npz")
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        for key in ("values", "b"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
    assert not np.allclose(want["b"], 0.0)  # It trained.
