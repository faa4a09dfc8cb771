"""jax.export of programs with jaxsparse weights (jaxsparse/_export.py): every format exports,
serialises, and runs in a fresh process with identical outputs; the custom-call check; the ABI
document covers every target."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import _ffi
from tests.test_io import every_format

ROOT = Path(__file__).resolve().parents[1]
CUDA_ONLY = ("int4_marlin", "int4_nm_marlin")  # MARLIN layouts: no CPU kernel reads them


def model(params, x):
    """A small model around one compressed layer: sparse product, bias, tanh, dense head."""
    h = jnp.tanh(x @ params["w"] + params["b"])
    return h @ params["head"]


def params_of(w):
    out = w.shape[-1]
    return {"w": w, "b": jnp.linspace(-0.5, 0.5, out, dtype=w.dtype),
            "head": jnp.ones((out, 3), w.dtype) / out}


def inputs_for(w, tokens=5):
    rng = np.random.default_rng(7)
    return jnp.asarray(rng.standard_normal((tokens, w.shape[-2])), w.dtype)


def targets_in(exported):
    return sorted(set(re.findall(r"custom_call @(\w+)", exported.mlir_module())))


def export_on_kernels(fun, *args, platforms=None):
    # Few tokens would pick the dense path for small layers; the kernels are what is at stake.
    with jsp.matmul_path("sparse"):
        return jsp.export(fun, platforms=platforms)(*args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every CPU format's model exported in this process, with its inputs and outputs on disk."""
    folder = tmp_path_factory.mktemp("export")
    weights = {k: w for k, w in every_format().items() if k not in CUDA_ONLY}
    arrays, programs = {}, {}
    for name, w in weights.items():
        params, x = params_of(w), inputs_for(w)
        programs[name] = export_on_kernels(model, params, x)
        with jsp.matmul_path("sparse"):
            expected = jax.jit(model)(params, x)
        (folder / f"{name}.bin").write_bytes(programs[name].serialize())
        arrays.update({f"{name}.x": x, f"{name}.b": params["b"], f"{name}.head": params["head"],
                       f"{name}.expected": expected})
    jsp.save_safetensors(folder / "weights.safetensors", weights)
    jsp.save_safetensors(folder / "arrays.safetensors", arrays)
    return folder, weights, programs


def test_every_format_exports_onto_its_kernel(exported):
    _, weights, programs = exported
    for name, program in programs.items():
        targets = targets_in(program)
        assert targets and all(t.startswith("jaxsparse_") for t in targets), (name, targets)
        assert program.platforms == ("cpu",)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import jaxsparse as jsp
    folder = Path(sys.argv[1])
    weights = jsp.load_safetensors(folder / "weights.safetensors")
    arrays = jsp.load_safetensors(folder / "arrays.safetensors")
    result = {}
    for name, w in weights.items():
        program = jsp.deserialize((folder / f"{name}.bin").read_bytes())
        params = {"w": w, "b": arrays[f"{name}.b"], "head": arrays[f"{name}.head"]}
        y = np.asarray(program.call(params, arrays[f"{name}.x"]))
        result[name] = bool(np.array_equal(y, arrays[f"{name}.expected"]))
    print(json.dumps(result))
""")


def test_exported_models_run_in_a_fresh_process_with_identical_outputs(exported):
    folder, weights, _ = exported
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {name: True for name in weights}


def test_the_format_and_spec_are_part_of_the_signature(exported):
    _, weights, programs = exported
    program = jsp.deserialize(programs["nm"].serialize())
    params = params_of(weights["nm"])
    rebuilt = jax.tree_util.tree_unflatten(program.in_tree, [None] * program.in_tree.num_leaves)
    assert type(rebuilt[0][0]["w"]) is jsp.NMSparse and rebuilt[0][0]["w"].spec == jsp.NM(2, 4)
    other = dict(params, w=jsp.fromdense(weights["nm"].todense(), "1:4"))
    with pytest.raises(ValueError, match="pytree structure"):
        program.call(other, inputs_for(weights["nm"]))


def test_jax_export_alone_refuses_and_custom_call_checks_allow_only_ours():
    w = jsp.fromdense(jnp.ones((64, 32)), "2:4")
    x = jnp.ones((5, 64))
    with jsp.matmul_path("sparse"), pytest.raises(ValueError, match="jaxsparse_nm_spmm"):
        jax.export.export(jax.jit(model))(params_of(w), x)
    checks = jsp.custom_call_checks()
    assert len(checks) == len(set().union(*_ffi._TARGETS.values()))
    with jsp.matmul_path("sparse"):
        program = jax.export.export(jax.jit(model), disabled_checks=checks)(params_of(w), x)
    assert targets_in(program) == ["jaxsparse_nm_spmm_packed"]


def test_a_training_step_exports():
    # The values' gradient goes through the sddmm target: a fine-tuning step exports too.
    w = jsp.fromdense(jax.random.normal(jax.random.key(1), (64, 32)), "2:4")
    x = inputs_for(w, tokens=16)

    def step(w, x):
        loss = lambda values: jnp.sum(model(params_of(w.replace(values=values)), x) ** 2)
        return w.replace(values=w.values - 0.1 * jax.grad(loss)(w.values))

    program = export_on_kernels(step, w, x)
    assert "jaxsparse_nm_sddmm" in targets_in(program)
    again = jsp.deserialize(program.serialize()).call(w, x)
    with jsp.matmul_path("sparse"):
        expected = jax.jit(step)(w, x)
    assert isinstance(again, jsp.NMSparse)
    np.testing.assert_array_equal(again.values, expected.values)


# Lowering for CUDA onto our kernels needs their targets, registered by the CUDA module (built
# where nvcc is); without it the ops lower to their pure-JAX reference, with a warning.
needs_cuda_module = pytest.mark.skipif(not jsp.has_cuda_kernels(),
                                       reason="the CUDA module was not built (no nvcc)")


@needs_cuda_module
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_marlin_layouts_export_for_cuda(name):
    w = every_format()[name]
    program = export_on_kernels(model, params_of(w), inputs_for(w), platforms=("cuda",))
    assert targets_in(program) == [f"jaxsparse_{name}_matmul"]
    assert jsp.deserialize(program.serialize()).platforms == ("cuda",)


@needs_cuda_module
def test_one_program_for_cpu_and_cuda():
    w = jsp.fromdense(jax.random.normal(jax.random.key(2), (64, 32)), "2:4")
    params, x = params_of(w), inputs_for(w)
    program = export_on_kernels(model, params, x, platforms=("cpu", "cuda"))
    assert program.platforms == ("cpu", "cuda")
    # The CPU's kernel reads the 2-bit positions too; CUDA's the canonical ones.
    assert targets_in(program) == ["jaxsparse_nm_spmm", "jaxsparse_nm_spmm_packed"]
    with jsp.matmul_path("sparse"):
        expected = jax.jit(model)(params, x)
    np.testing.assert_array_equal(jsp.deserialize(program.serialize()).call(params, x), expected)


@pytest.mark.cpu_only
def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="jaxsparse.export: fun must be callable"):
        jsp.export(3)
    with pytest.raises(TypeError, match="jaxsparse.deserialize: blob must be bytes"):
        jsp.deserialize("not bytes")


@pytest.mark.cpu_only
def test_every_registered_target_is_documented():
    documented = set(re.findall(r"`(jaxsparse_\w+)`", (ROOT / "docs/ffi_abi.md").read_text()))
    registered = set().union(*_ffi._TARGETS.values())
    undocumented = sorted(t for t in registered
                          if t not in documented and t.replace("_emu_", "_", 1) not in documented)
    assert not undocumented, f"targets missing from docs/ffi_abi.md: {undocumented}"
    assert jsp.FFI_ABI_VERSION == 1


def test_a_1xn_signature_of_an_older_program_reads_its_balance_into_the_spec():
    # Programs serialised by 59a3c92 kept 1xN's shards after the shape; now it is the spec's.
    from jaxsparse import _export

    read = _export._deserialize_aux(jsp.BlocksSparse)
    legacy = {"spec": {"type": "Blocks", "fields": {"n": 16, "density": 0.25}},
              "static": [32, 128, 4]}
    assert read(json.dumps(legacy).encode()) == (16, 0.25, 4, "out", 32, 128)
    ws = jsp.fromdense(jnp.ones((32, 128)), jsp.Blocks(16, 0.25, shards=4))
    assert read(_export._serialize_aux(jsp.BlocksSparse)(ws._aux)) == ws._aux
