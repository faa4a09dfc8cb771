"""Calibration for second-order compression: each dense layer's input Gram matrix `X^T X`, from
an nnx model (`calibrate`) or a linen `apply` (`calibrate_linen`), without touching the model's
code; and `one_shot`, which drives `sparsegpt` / `gptq` over a whole nnx model.

The layers are found while the model runs: every call of `nnx.Linear.__call__` (linen:
`nn.Dense.__call__`, through `flax.linen.intercept_methods`) adds `x^T x` of its inputs
(flattened to `[tokens, in]`, in float32) to that layer's running sum. Only the sums are kept
(`in x in` per layer), never the activations. One batch runs as one jit-compiled program that
returns every layer's Gram of that batch; batches of a new shape compile once more.
"""

from __future__ import annotations

import contextlib
import re
import threading
import typing as tp
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsparse import _validate as V
from jaxsparse.prune._layerwise import check_mapping
from jaxsparse.prune._patterns import as_pattern
from jaxsparse.prune._sparsegpt import _REFIT_STEPS, sparsegpt


class GramStats(tp.NamedTuple):
    """One layer's calibration statistics.

    Attributes:
        gram: `[in, in]` float32, `sum over tokens of x x^T` (`X^T X`).
        count: the number of tokens (rows of `X`) summed.
    """

    gram: jax.Array
    count: int


# ====================================================================== nnx
def calibrate(model, batches, *, filter=None, progress: bool = True) -> dict[str, GramStats]:
    """Run an nnx model over calibration batches and sum each `nnx.Linear`'s input Gram matrix.

    Args:
        model: an nnx Module (not modified; it runs as a copy).
        batches: an iterable of model inputs: an array (`model(batch)`), a tuple (`model(*batch)`)
            or a dict (`model(**batch)`). Padding tokens count like any other: batch sentences
            of equal length, or mask what the statistics should not see.
        filter: which layers: None (all), a regular expression searched in the '/'-joined
            module path (e.g. `"^encoder/"`), or a predicate `(path, module) -> bool`.
        progress: show a progress bar (tqdm) over the batches.

    Returns:
        `{path: GramStats}` for every selected Linear that ran, in the order of their first
        call (the order `one_shot(..., sequential=True)` compresses them).

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import nnx
        >>> mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
        ...                      nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
        >>> stats = jsp.prune.calibrate(mlp, [jnp.ones((4, 8))] * 3, progress=False)
        >>> {path: (s.gram.shape, s.count) for path, s in stats.items()}
        {'layers/0': ((8, 8), 12), 'layers/2': ((16, 16), 12)}
    """
    where = "jaxsparse.prune.calibrate"
    runner = _NnxRunner(model, filter, where)
    return _accumulate(runner, batches, progress, where)


class _NnxRunner:
    """One jit-compiled program per batch shape: merge the model, run it, return its Grams."""

    def __init__(self, model, filter, where):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"{where}: model must be an nnx.Module; got {type(model).__name__}")
        from jaxsparse.nn import _layout  # Late: jaxsparse.nn imports jaxsparse.prune.

        selected = _layout.make_filter(filter, where)
        self.graphdef, self.state = nnx.split(model)
        self.paths = {_layout.path_str(path): path for path, module in nnx.iter_modules(model)
                      if isinstance(module, nnx.Linear) and selected(path, module)}
        self._run = jax.jit(self._grams, static_argnums=2)

    def update(self, model):
        self.state = nnx.state(model)

    def _grams(self, state, arrays, static):
        model = nnx.merge(self.graphdef, state)
        names = {id(module): name for name, module in _modules(model, self.paths)}
        args, kwargs = _join_batch(arrays, static)
        with _recording(lambda layer: names.get(id(layer))) as grams:
            model(*args, **kwargs)
        return grams

    def __call__(self, batch):
        with _patched(nnx.Linear):
            return self._run(self.state, *_split_batch(batch))


def _modules(model, paths):
    from jaxsparse.nn import _layout

    for path, module in nnx.iter_modules(model):
        name = _layout.path_str(path)
        if name in paths:
            yield name, module


# ====================================================================== linen
def calibrate_linen(module, variables, batches, *, method=None, filter=None,
                    progress: bool = True) -> dict[str, GramStats]:
    """Run a linen `module.apply(variables, ...)` over calibration batches and sum each
    `nn.Dense`'s input Gram matrix.

    Args:
        module: a linen Module.
        variables: its variables (`{"params": ...}`).
        batches: an iterable of inputs to `apply`: an array, a tuple (positional) or a dict
            (keyword arguments).
        method: the method to apply (as in `Module.apply`), default `__call__`.
        filter: None (all), a regular expression searched in the '/'-joined path of the layer's
            parameters (`"Dense_0"`, `"encoder/layers_1/attn/query"`), or a predicate
            `(path, module) -> bool`.
        progress: show a progress bar over the batches.

    Returns:
        `{path: GramStats}` keyed by the path of each Dense's parameters, in the order of their
        first call.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxsparse as jsp
        >>> mlp = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
        >>> x = jnp.ones((4, 8))
        >>> variables = mlp.init(jax.random.key(0), x)
        >>> stats = jsp.prune.calibrate_linen(mlp, variables, [x, x], progress=False)
        >>> {path: s.count for path, s in stats.items()}
        {'layers_0': 8, 'layers_2': 8}
    """
    where = "jaxsparse.prune.calibrate_linen"
    runner = _LinenRunner(module, variables, method, filter, where)
    return _accumulate(runner, batches, progress, where)


class _LinenRunner:
    def __init__(self, module, variables, method, filter, where):
        import flax.linen as nn
        from jaxsparse.nn import _layout

        if not isinstance(module, nn.Module):
            raise TypeError(f"{where}: module must be a flax.linen Module; got "
                            f"{type(module).__name__}")
        if not isinstance(variables, Mapping):
            raise TypeError(f"{where}: variables must be the module's variables (a mapping "
                            f"such as {{'params': ...}}); got {type(variables).__name__}")
        self.module, self.variables, self.method = module, variables, method
        self.selected = _layout.make_filter(filter, where)
        self._run = jax.jit(self._grams, static_argnums=2)

    def _grams(self, variables, arrays, static):
        import flax.linen as nn

        args, kwargs = _join_batch(arrays, static)
        grams: dict = {}

        def intercept(next_fun, call_args, call_kwargs, context):
            layer = context.module
            if context.method_name == "__call__" and isinstance(layer, nn.Dense):
                path = tuple(layer.scope.path)
                if self.selected(path, layer):
                    _add(grams, "/".join(path), call_args[0])
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(intercept):
            self.module.apply(variables, *args, method=self.method, **kwargs)
        return grams

    def __call__(self, batch):
        return self._run(self.variables, *_split_batch(batch))


# ====================================================================== shared
def _accumulate(runner, batches, progress, where) -> dict[str, GramStats]:
    if isinstance(batches, (jax.Array, np.ndarray)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{where}: batches must be an iterable of model inputs (a list of "
                        f"arrays, tuples or dicts); got {type(batches).__name__}")
    total: dict[str, list] = {}
    seen = 0
    for batch in _progress(batches, progress, "calibration"):
        for key, (gram, count) in runner(batch).items():
            name = key.split(":", 1)[1]
            if name in total:
                total[name][0] = total[name][0] + gram
                total[name][1] += int(count)
            else:
                total[name] = [gram, int(count)]
        seen += 1
    if not seen:
        raise ValueError(f"{where}: batches is empty: calibration needs at least one batch")
    return {name: GramStats(gram, count) for name, (gram, count) in total.items()}


def _split_batch(batch):
    """A batch as `(arrays, static)`: its array leaves (traced) and the rest (flags such as
    `deterministic=True`, static: each value compiles its own program)."""
    if isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    elif isinstance(batch, tuple):
        args, kwargs = batch, {}
    else:
        args, kwargs = (batch,), {}
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, tuple(is_array), static)


def _join_batch(arrays, static):
    treedef, is_array, values = static
    arrays = iter(arrays)
    leaves = [next(arrays) if a else value for a, value in zip(is_array, values)]
    return jax.tree.unflatten(treedef, leaves)


def _add(grams, name, inputs):
    """Add `x^T x` of a layer's inputs `[..., in]` to `grams` under `"<call index>:<name>"` (the
    index keeps the order of first calls: jit returns a dict's keys sorted)."""
    x = jnp.reshape(inputs, (-1, inputs.shape[-1])).astype(jnp.float32)
    gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    key = next((k for k in grams if k.split(":", 1)[1] == name), f"{len(grams):05d}:{name}")
    if key in grams:
        old, count = grams[key]
        grams[key] = (old + gram, count + x.shape[0])
    else:
        grams[key] = (gram, np.int64(x.shape[0]))


_STATE = threading.local()
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _recording(name_of):
    """While tracing: every call of a patched layer type's `__call__` on a layer that `name_of`
    names adds its input's Gram to the yielded dict."""
    grams: dict = {}
    previous = getattr(_STATE, "record", None)

    def record(layer, inputs):
        name = name_of(layer)
        if name is not None:
            _add(grams, name, inputs)

    _STATE.record = record
    try:
        yield grams
    finally:
        _STATE.record = previous


@contextlib.contextmanager
def _patched(layer_type):
    """`layer_type.__call__` reports its inputs to the thread's recorder while inside (class
    level: the model's code is untouched, and nnx calls the class's method)."""
    original = layer_type.__call__

    def call(self, inputs, *args, **kwargs):
        record = getattr(_STATE, "record", None)
        if record is not None:
            record(self, inputs)
        return original(self, inputs, *args, **kwargs)

    with _PATCH_LOCK:
        layer_type.__call__ = call
        try:
            yield
        finally:
            layer_type.__call__ = original


def _progress(items, enabled, desc, total=None):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; keep working without it.
        return items
    return tqdm(items, desc=desc, total=total, leave=False)


# ====================================================================== the model driver
def one_shot(model, batches, spec, *, sequential: bool | str = False, damp: float = 0.01,
             filter=None, progress: bool = True, stats: Mapping | None = None,
             refit: int = _REFIT_STEPS) -> dict:
    """Compress every `nnx.Linear` of a model one-shot by SparseGPT (sparse specs) or GPTQ
    (int4 specs), from calibration batches.

    Args:
        model: an nnx Module (not modified).
        batches: calibration inputs, as for `calibrate` (iterated once per layer when
            `sequential`).
        spec: one spec for every layer (`jaxsparse.NM(2, 4)`, `"64:2:8"`, `jaxsparse.Int4(128)`,
            `jaxsparse.Int4(128, sparsity=jaxsparse.NM(2, 4))`, ...) or a mapping
            `{layer path: spec}` (layers it does not name are left alone).
        sequential: False: one pass gives every layer's statistics from the dense model.
            True: each layer's statistics are taken with the layers called before it already
            compressed (one calibration pass per layer). A regular expression: stages, as the
            SparseGPT paper's blocks: the layers whose paths give the same match of it (e.g.
            `r"^layers/[0-9]+/"`: one transformer block) form a stage, compressed together from one
            pass with the earlier stages compressed (a layer it does not match is its own
            stage).
        damp: dampening of every layer's Gram matrix (see `sparsegpt`).
        refit: conjugate-gradient steps re-solving each sparse layer's kept weights for its mask
            (see `sparsegpt`; 0: none).
        filter: which layers (as for `calibrate`).
        progress: progress bars over the layers and the batches.
        stats: the one-pass statistics `calibrate(model, batches)` already gave (to compress
            one model many ways from one calibration); then `batches` may be None. Not with
            `sequential`.

    Returns:
        `{layer path: compressed weight}` (formats of the specs), in call order; pass it to
        `jaxsparse.nn.sparsify(model, spec, method=weights)` for the compressed model.
        Layers the spec cannot take (e.g. `in` not a multiple of an int4 group) are left out
        and logged on the "jaxsparse" logger.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import nnx
        >>> mlp = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.relu,
        ...                      nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
        >>> x = jax.random.normal(jax.random.key(0), (64, 16))
        >>> weights = jsp.prune.one_shot(mlp, [x], "2:4", progress=False)
        >>> sparse = jsp.nn.sparsify(mlp, "2:4", method=weights)
        >>> type(sparse.layers[0]).__name__
        'SparseLinear'
    """
    where = "jaxsparse.prune.one_shot"
    specs = _specs_of(spec, where)
    V.check_int("refit", refit, low=0, high=2**31 - 1, where=where)
    if stats is not None:
        if sequential:
            raise ValueError(f"{where}: stats= is one pass's statistics; sequential=True takes "
                             "its own (pass batches, not stats)")
        return _solve_all(model, stats, specs, damp, refit, filter, where)
    if isinstance(batches, (jax.Array, np.ndarray)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{where}: batches must be an iterable of model inputs; got "
                        f"{type(batches).__name__}")
    stage_of = _stages(sequential, where)
    batches = list(batches) if sequential else batches
    work = nnx.clone(model) if sequential else model
    runner = _NnxRunner(work, filter, where)
    stats = _accumulate(runner, batches, progress, where)
    layers = dict(_modules(work, runner.paths))
    stages: dict[str, list[str]] = {}
    for name in stats:  # In the order of first calls.
        if specs(name) is not None:
            stages.setdefault(stage_of(name), []).append(name)
    weights = {}
    for index, names in enumerate(_progress(list(stages.values()), progress and bool(sequential),
                                            "stages")):
        if sequential and index:  # This stage's inputs through the stages compressed before.
            runner.update(work)
            stats = _accumulate(runner, batches, progress, where)
        for name in names:
            compressed = _solve_layer(layers[name], stats[name], specs(name), damp, refit,
                                      name, where)
            if compressed is None:
                continue
            weights[name] = compressed
            if sequential:
                layers[name].kernel.set_value(compressed.todense().astype(
                    layers[name].kernel[...].dtype))
    return weights


def _stages(sequential, where):
    """A layer's stage: one for all (False), its own (True), or its match of a regex."""
    if isinstance(sequential, bool):
        return (lambda name: name) if sequential else (lambda name: "")
    if not isinstance(sequential, str):
        raise TypeError(f"{where}: sequential must be a bool or a regular expression naming "
                        f"the stages; got {type(sequential).__name__} {sequential!r}")
    try:
        regex = re.compile(sequential)
    except re.error as err:
        raise ValueError(f"{where}: sequential={sequential!r} is not a valid regular "
                         f"expression: {err}") from None

    def stage(name):
        found = regex.search(name)
        return found.group(0) if found else name

    return stage


def _solve_all(model, stats, specs, damp, refit, filter, where):
    from jaxsparse.nn import _layout

    if not isinstance(stats, Mapping) or not all(isinstance(v, GramStats)
                                                 for v in stats.values()):
        raise TypeError(f"{where}: stats must be calibrate()'s {{path: GramStats}}; got "
                        f"{type(stats).__name__}")
    selected = _layout.make_filter(filter, where)
    layers = {_layout.path_str(path): module for path, module in nnx.iter_modules(model)
              if isinstance(module, nnx.Linear) and selected(path, module)}
    weights = {}
    for name, layer_stats in stats.items():
        layer_spec = specs(name)
        if layer_spec is None or name not in layers:
            continue
        compressed = _solve_layer(layers[name], layer_stats, layer_spec, damp, refit, name,
                                  where)
        if compressed is not None:
            weights[name] = compressed
    return weights


def _specs_of(spec, where):
    """A function `layer path -> pattern | None`; mapping keys may name the layer or its kernel."""
    if isinstance(spec, Mapping):
        table = check_mapping(spec, where, arg="spec")
        return lambda name: table.get(name, table.get(f"{name}/kernel"))
    one = as_pattern(spec, name="spec")
    return lambda name: one


def _solve_layer(layer, stats, spec, damp, refit, name, where):
    """The layer's compressed weight (`sparsegpt`, which runs GPTQ for dense int4), or None
    (logged) for a layer the spec cannot take."""
    from jaxsparse.nn import _layout

    kernel = layer.kernel[...]
    reason = spec.fits_shape(tuple(kernel.shape)) if hasattr(spec, "fits_shape") else \
        "unstructured sparsity has no format for a layer"
    if reason is not None:
        _layout.logger.info("%s: skipped %s: %s", where, name, reason)
        return None
    return sparsegpt(kernel, stats.gram, spec, damp=damp, refit=refit)
