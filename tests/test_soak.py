"""Concurrency soak (issue 15, point 4): 8 threads call jitted jaxsparse products of every CPU
format for a while; every result must equal the single-threaded one bit for bit, nothing may
raise, and the process's resident memory must stay flat.

The suite runs it for a few seconds; `make soak` runs it for a minute
(JAXSPARSE_SOAK_SECONDS=60). Our handlers keep per-thread buffers (the int4 W4A8 quantiser), share
XLA's pool and, for chains of short calls, helper threads of their own: this is where a race
between callers would show.
"""

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

THREADS = 8
SECONDS = float(os.environ.get("JAXSPARSE_SOAK_SECONDS", "4"))
# Resident memory may grow this much from the end of the warm-up to the end (allocator caches,
# jit caches filling up); a leak of one buffer per call would pass it within seconds.
MAX_GROWTH_MIB = 64


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def workloads():
    """(name, jitted function, its argument tuples): forward products of every CPU format at a
    few token counts (so the small-token, tile and pool-split kernels all run), and N:M's
    training step (both backward products)."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((256, 192)).astype(np.float32)
    weights = {
        "2:4": jsp.fromdense(w, "2:4"),
        "2:4 bf16": jsp.fromdense(w.astype(jnp.bfloat16), "2:4"),
        "64:2:8": jsp.fromdense(w, jsp.VNM(64, 2, 8)),
        "1x16": jsp.fromdense(w, jsp.Blocks(16, density=0.25)),
        "int4": jsp.fromdense(w, jsp.Int4(128)),
        "int4 W4A8": jsp.fromdense(w, jsp.Int4(128, activations="int8")),
        "int4+2:4": jsp.fromdense(w, jsp.Int4(128, jsp.NM(2, 4))),
    }
    out = []
    for name, weight in weights.items():
        dtype = weight.dtype
        xs = [jnp.asarray(rng.standard_normal((t, 256)), dtype) for t in (1, 7, 64, 300)]
        fn = jax.jit(lambda x, w=weight: x @ w)
        out.append((name, fn, [(x,) for x in xs]))
    nm = weights["2:4"]

    def step(values, x):
        loss = lambda v: jnp.sum(jnp.tanh(x @ nm.replace(values=v)) ** 2)
        return jax.value_and_grad(loss)(values)

    xs = [jnp.asarray(rng.standard_normal((t, 256)), jnp.float32) for t in (5, 96)]
    out.append(("2:4 training step", jax.jit(step), [(nm.values, x) for x in xs]))
    return out


def run(fn, args):
    return jax.tree_util.tree_map(np.asarray, jax.block_until_ready(fn(*args)))


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_eight_threads_get_single_threaded_results_and_memory_stays_flat():
    jobs = [(name, fn, args) for name, fn, many in workloads() for args in many]
    with jsp.matmul_path("sparse"):  # the kernels, not XLA's dot, are what is soaked
        expected = [run(fn, args) for _, fn, args in jobs]  # compiles each once, on one thread
    failures, calls, lock = [], [0] * THREADS, threading.Lock()
    start = time.monotonic()
    deadline = start + SECONDS
    samples = []

    def worker(tid):
        i = tid
        while time.monotonic() < deadline:
            name, fn, args = jobs[i % len(jobs)]
            try:
                if not same(run(fn, args), expected[i % len(jobs)]):
                    with lock:
                        failures.append(f"{name}: result differs from the single-threaded one")
            except Exception as err:  # noqa: BLE001 - every error is a failure to report
                with lock:
                    failures.append(f"{name}: {type(err).__name__}: {err}")
            calls[tid] += 1
            i += 3  # threads walk the jobs at different offsets: different ops at once

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - start, resident_mib()))
        time.sleep(min(0.5, SECONDS / 20))
    for t in threads:
        t.join()

    assert not failures, failures[:10]
    assert min(calls) > 0, calls
    warm = [mib for when, mib in samples if when >= SECONDS / 4]
    growth = warm[-1] - warm[0] if len(warm) >= 2 else 0.0
    print(f"soak: {sum(calls)} calls in {SECONDS:.0f} s on {THREADS} threads; resident "
          f"{warm[0] if warm else 0:.0f} -> {warm[-1] if warm else 0:.0f} MiB")
    assert growth < MAX_GROWTH_MIB, f"resident memory grew {growth:.0f} MiB: {samples}"


@pytest.mark.cpu_only
def test_resident_memory_is_measured():
    assert 10 < resident_mib() < 24 * 1024
