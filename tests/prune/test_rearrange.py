"""Filter rearrangement for 1xN blocks: the layer search, the permutation helpers, and the
model-level dataflow analysis (function preserved, skip reasons) for nnx and linen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import jaxsparse as jsp
from jaxsparse import prune

SPEC = jsp.Blocks(4, 0.25)


def planted(rows, out, n, seed=0, support=0.3):
    """Filters in hidden groups of `n` that are large on the same inputs, shuffled."""
    rng = np.random.default_rng(seed)
    label = rng.permutation(np.repeat(np.arange(out // n), n))
    on = rng.random((rows, out // n)) < support
    return (rng.standard_normal((rows, out)) * (0.2 + on[:, label])).astype(np.float32)


def randomize(model, seed=0):
    """Every float leaf of the model's state random (so every permuted vector matters);
    variances positive."""
    state = nnx.state(model)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    keys = jax.random.split(jax.random.key(seed), len(flat))
    new = []
    for (path, leaf), key in zip(flat, keys):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            leaf = jax.random.normal(key, leaf.shape, leaf.dtype)
            if leaf.ndim >= 2:  # A kernel: unit-variance outputs, as at initialisation.
                leaf = leaf / np.sqrt(np.prod(leaf.shape[:-1]))
            if "var" in jax.tree_util.keystr(path):
                leaf = jnp.exp(leaf)
        new.append(leaf)
    nnx.update(model, jax.tree_util.tree_unflatten(jax.tree.structure(state), new))
    return model


def assert_same_function(y1, y0):
    """Equal to 1e-6 of the output's scale: a permutation only reorders the consumers' sums."""
    y0, y1 = np.asarray(y0), np.asarray(y1)
    assert np.max(np.abs(y1 - y0)) <= 1e-6 * max(1.0, np.max(np.abs(y0)))


# ---------------------------------------------------------------------- the layer
def test_kept_block_norm_by_hand():
    # 2 rows x 8 outputs, 1x4 blocks: 4 blocks with norms 1+4=5, 9, 0, 16+1=17; keep 2 -> 26.
    w = np.zeros((2, 8), np.float32)
    w[0, [0, 1]] = [1, 2]
    w[0, 5] = 3
    w[1, [6, 7]] = [4, 1]
    assert prune.kept_block_norm(w, jsp.Blocks(4, 0.5)) == 26.0
    # A Conv HWIO kernel is folded to [kh*kw*Cin, Cout]: the same value as the 2-D view.
    w4 = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
    assert prune.kept_block_norm(w4, "1x4@0.25") == pytest.approx(
        prune.kept_block_norm(w4.reshape(36, 8), "1x4@0.25"), rel=1e-12)


def test_rearrangement_strictly_raises_the_kept_norm_on_a_constructed_kernel():
    # Row 0 uses the even outputs, row 1 the odd ones: in the identity order every 1x4 block
    # holds half of a row; grouped, two blocks hold everything. (The L1 sort sees equal
    # filters, and the swap search from it a saddle: every single swap gains 0 to first order.)
    w = np.array([[1.0, 0.0] * 4, [0.0, 1.0] * 4], np.float32)
    spec = jsp.Blocks(4, 0.5)
    assert prune.kept_block_norm(w, spec) == 4.0
    perm = prune.rearrange_outputs(w, spec)
    assert sorted(perm.tolist()) == list(range(8))
    assert prune.kept_block_norm(prune.apply_output_permutation(w, perm), spec) == 8.0


@pytest.mark.parametrize("method", prune._rearrange.METHODS)
@pytest.mark.parametrize("shape,spec", [
    ((64, 96), jsp.Blocks(16, 0.25)),
    ((3, 3, 8, 36), jsp.Blocks(8, 0.3)),  # Conv HWIO; out=36 leaves a partial last block.
    ((40, 10), jsp.Blocks(4, 0.5)),
    ((64, 96), jsp.Blocks(16, 0.25, shards=2)),  # Balanced runs of block rows ...
    ((3, 3, 8, 36), jsp.Blocks(8, 0.2, shards=4, split="in")),  # ... and of inputs.
], ids=str)
def test_every_method_returns_a_permutation_never_worse_than_the_identity(method, shape, spec):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    w *= np.exp(np.random.default_rng(2).standard_normal(shape[-1]))  # Filters of varied norm.
    perm = prune.rearrange_outputs(w, spec, method=method)
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(shape[-1]))
    before = prune.kept_block_norm(w, spec)
    after = prune.kept_block_norm(prune.apply_output_permutation(w, perm), spec)
    assert after >= before
    assert np.array_equal(prune.rearrange_outputs(w, spec, method=method), perm)  # Deterministic.


def test_cluster_beats_the_papers_sort_on_filters_sharing_inputs():
    # Measured: sort keeps ~0.51 of the norm, cluster ~0.8 (the hidden groups recovered).
    w = planted(256, 256, 16)
    spec = jsp.Blocks(16, 0.25)
    kept = {m: prune.kept_block_norm(
        prune.apply_output_permutation(w, prune.rearrange_outputs(w, spec, method=m)), spec)
        / float(np.sum(w.astype(np.float64) ** 2)) for m in ("sort", "swap", "cluster")}
    assert kept["cluster"] > kept["sort"] + 0.15
    assert kept["swap"] >= kept["sort"]


def test_sort_is_the_papers_l1_order():
    # Filter j has magnitude c[j] on every input: grouping the 4 largest keeps 4 * 174 of the
    # squared norm, the identity order 4 * 118.
    c = np.array([1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0], np.float32)
    w = np.tile(c, (4, 1))
    perm = prune.rearrange_outputs(w, jsp.Blocks(4, 0.5), method="sort")
    assert perm.tolist() == [1, 3, 5, 7, 6, 4, 2, 0]
    assert prune.kept_block_norm(w, jsp.Blocks(4, 0.5)) == 4 * 118
    assert prune.kept_block_norm(w[:, perm], jsp.Blocks(4, 0.5)) == 4 * 174


def test_permutation_helpers_validate_perm():
    k = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(prune.apply_input_permutation(k, [2, 0, 1]), k[[2, 0, 1]])
    assert np.array_equal(prune.apply_output_permutation(k, [3, 2, 1, 0]), k[:, ::-1])
    assert np.array_equal(prune.apply_output_permutation(np.arange(3.0), [1, 2, 0]), [1, 2, 0])
    with pytest.raises(ValueError, match=r"apply_output_permutation: perm must be a permutation "
                                         r"of range\(4\).*repeated entries \[1\]"):
        prune.apply_output_permutation(k, [0, 1, 1, 3])
    with pytest.raises(ValueError, match=r"apply_input_permutation: perm must be a 1-D "
                                         r"permutation of length 3.*got shape \(4,\)"):
        prune.apply_input_permutation(k, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"out-of-range entries \[5\]"):
        prune.apply_input_permutation(k, [0, 5, 1])
    with pytest.raises(TypeError, match="perm must be an integer array, got float"):
        prune.apply_output_permutation(k, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="kernel must have at least 2 dimensions"):
        prune.apply_input_permutation(np.ones(3), [0, 1, 2])


def test_layer_level_bad_input():
    w = np.ones((8, 16), np.float32)
    with pytest.raises(ValueError, match="rearrange_outputs: spec must be a 1xN spec.*NM"):
        prune.rearrange_outputs(w, "2:4")
    with pytest.raises(ValueError, match=r"method must be one of .*'cluster'.*got 'kmeans'"):
        prune.rearrange_outputs(w, SPEC, method="kmeans")
    with pytest.raises(TypeError, match="kernel must be a float array, got int32"):
        prune.kept_block_norm(np.ones((8, 16), np.int32), SPEC)
    with pytest.raises(ValueError, match="kernel must be finite"):
        prune.rearrange_outputs(np.full((8, 16), np.nan, np.float32), SPEC)


# ---------------------------------------------------------------------- the model (nnx)
class LinearChain(nnx.Module):
    """Linear -> relu -> LayerNorm -> Linear -> relu -> Linear (the output layer)."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)
        self.out = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.fc2(self.norm(nnx.relu(self.fc1(x))))))


class ConvChain(nnx.Module):
    """Conv -> BatchNorm -> relu -> Conv -> relu -> flatten -> Linear."""

    def __init__(self, rngs, train=False):
        self.c1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, use_running_average=not train, rngs=rngs)
        self.c2 = nnx.Conv(16, 8, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(8 * 3 * 3, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c2(nnx.relu(self.bn(self.c1(x)))))
        return self.fc(x.reshape(x.shape[0], -1))


def check_preserved(model, x, spec=SPEC, **kw):
    """rearrange_filters with its own check off: the test compares the outputs itself."""
    y0 = model(x)
    report = prune.rearrange_filters(model, spec, x, check=False, **kw)
    assert_same_function(model(x), y0)
    return report


def test_linear_relu_layernorm_linear_keeps_its_function():
    model = randomize(LinearChain(nnx.Rngs(0)))
    scale = np.asarray(model.norm.scale[...])
    x = jax.random.normal(jax.random.key(1), (4, 12))
    report = check_preserved(model, x)
    fc1, fc2, out = report["fc1/kernel"], report["fc2/kernel"], report["out/kernel"]
    assert fc1.skipped is None and fc1.consumers == ("fc2/kernel",)
    assert fc1.companions == ("fc1/bias", "norm/bias", "norm/scale")
    assert np.array_equal(model.norm.scale[...], scale[fc1.perm])  # The norm moved too.
    assert fc2.skipped is None and fc2.consumers == ("out/kernel",)
    assert out.skipped.startswith("its outputs reach the model's output")
    for r in (fc1, fc2):
        assert r.kept_after >= r.kept_before and r.total > 0
        assert r.fraction_after == pytest.approx(r.kept_after / r.total)
    text = str(report)
    assert "fc1/kernel" in text and "rearranged -> inputs of fc2/kernel" in text
    assert "skipped: its outputs reach the model's output" in text


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_conv_batchnorm_relu_conv_flatten_linear_keeps_its_function(train):
    model = randomize(ConvChain(nnx.Rngs(0), train=train))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    report = check_preserved(model, x)
    c1, c2 = report["c1/kernel"], report["c2/kernel"]
    assert c1.skipped is None and c1.consumers == ("c2/kernel",)
    assert set(c1.companions) == {"c1/bias", "bn/bias", "bn/mean", "bn/scale", "bn/var"}
    # c2 feeds the Linear through a flatten of NHWC features (index c + C*(h*W + w)).
    assert c2.skipped is None and c2.consumers == ("fc/kernel",)
    assert c1.kept_after > c1.kept_before  # Random filters of varied norm: something to gain.


def test_the_main_jobs_cnn_conv_relu_conv_relu_mean_linear():
    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            return self.head(x.mean(axis=(1, 2)))

    model = randomize(CNN(nnx.Rngs(0)))
    report = check_preserved(model, jnp.ones((2, 8, 8, 3)), jsp.Blocks(8, 0.25))
    assert [r.path for r in report.rearranged] == ["conv1/kernel", "conv2/kernel"]
    assert report["conv2"].consumers == ("head/kernel",)


def test_skip_reasons_residual_and_output():
    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(8, 16, rngs=rngs)
            self.a = nnx.Linear(16, 16, rngs=rngs)
            self.b = nnx.Linear(16, 16, rngs=rngs)
            self.out = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            h = self.inp(x)
            h = h + self.b(nnx.relu(self.a(h)))  # inp and b feed the residual sum.
            return self.out(h)

    model = randomize(Residual(nnx.Rngs(0)))
    report = check_preserved(model, jnp.ones((3, 8)))
    assert report["a"].skipped is None and report["a"].consumers == ("b/kernel",)
    for name in ("inp", "b"):
        assert "combines its features with a tensor that is not permuted with them (a " \
               "residual connection" in report[name].skipped
        assert report[name].perm is None and report[name].kept_after == report[name].kept_before
    assert "model's output" in report["out"].skipped


def test_skip_reasons_concatenation_slice_and_reuse():
    class Branches(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(8, 16, rngs=rngs)
            self.c = nnx.Linear(8, 16, rngs=rngs)
            self.d = nnx.Linear(32, 4, rngs=rngs)
            self.e = nnx.Linear(8, 4, rngs=rngs)
            self.f = nnx.Linear(8, 16, rngs=rngs)
            self.g = nnx.Linear(16, 4, rngs=rngs)
            self.h = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            cat = jnp.concatenate([self.a(x), self.b(x)], axis=-1)
            f = self.f(x)
            y = self.d(cat) + self.e(self.c(x)[:, :8]) + self.g(f)
            # h's features are summed over: a permutation-invariant use, safe.
            return y + self.h(x).sum(-1, keepdims=True), f  # f is also returned.

    model = randomize(Branches(nnx.Rngs(0)))
    y0 = model(jnp.ones((2, 8)))
    report = prune.rearrange_filters(model, SPEC, jnp.ones((2, 8)), check=False)
    for y1, y in zip(model(jnp.ones((2, 8))), y0):
        assert_same_function(y1, y)
    assert report["a"].skipped == "a concatenation along its features"
    assert "`slice` slices or gathers along its features" in report["c"].skipped
    assert report["f"].skipped.startswith("its outputs reach the model's output")
    assert report["h"].skipped is None and report["h"].consumers == ()


def test_dropout_and_shared_norm():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)
            self.b = nnx.Linear(8, 16, rngs=rngs)
            self.norm = nnx.RMSNorm(16, rngs=rngs)  # Applied after a and after b.
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.c = nnx.Linear(8, 16, rngs=rngs)
            self.d = nnx.Linear(16, 4, rngs=rngs)
            self.e = nnx.Linear(16, 4, rngs=rngs)
            self.f = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return (self.d(self.norm(self.a(x))) + self.e(self.norm(self.b(x)))
                    + self.f(self.drop(nnx.relu(self.c(x)))))

    model = randomize(M(nnx.Rngs(0)))
    report = prune.rearrange_filters(model, SPEC, jnp.ones((2, 8)))
    assert "the per-feature parameter norm/scale is also" in report["a"].skipped
    assert report["c"].skipped is None  # Dropout in training mode: an i.i.d. mask.
    model.drop.deterministic = True
    check_preserved(model, jnp.ones((2, 8)))


def test_spec_mapping_method_and_bad_input():
    model = randomize(LinearChain(nnx.Rngs(0)))
    x = jnp.ones((2, 12))
    report = check_preserved(model, x, {"fc1/kernel": jsp.Blocks(8, 0.5), "fc2": "1x4@0.5"},
                             method="sort")
    assert report["fc1"].spec == jsp.Blocks(8, 0.5) and report["fc2"].spec == jsp.Blocks(4, 0.5)
    assert report["out"].skipped == "no spec for this layer in spec"
    assert report.method == "sort"
    with pytest.raises(ValueError, match="rearrange_filters: spec must be a 1xN spec"):
        prune.rearrange_filters(model, "2:4", x)
    with pytest.raises(ValueError, match=r"spec\['fc1'\].*density must be in \(0, 1\]"):
        prune.rearrange_filters(model, {"fc1": jsp.Blocks(8, 1.5)}, x)
    with pytest.raises(ValueError, match="the spec mapping is empty"):
        prune.rearrange_filters(model, {}, x)
    with pytest.raises(TypeError, match=r"spec mapping keys must be '/'-joined leaf paths"):
        prune.rearrange_filters(model, {1: SPEC}, x)
    with pytest.raises(ValueError, match="method must be one of"):
        prune.rearrange_filters(model, SPEC, x, method="best")
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module; got dict"):
        prune.rearrange_filters({}, SPEC, x)
    with pytest.raises(TypeError, match="tracing the model on example_input failed"):
        prune.rearrange_filters(model, SPEC, jnp.ones((2, 5)))


def test_the_check_catches_a_wrong_analysis(monkeypatch):
    # A planted bug: the analysis forgets the per-feature vectors (bias, LayerNorm). The
    # built-in check must see the changed outputs and leave the model as it was.
    model = randomize(LinearChain(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 12))
    real = prune._rearrange._analyse

    def forgetful(*args, **kwargs):
        flow = real(*args, **kwargs)
        flow.companions.clear()
        return flow

    monkeypatch.setattr(prune._rearrange, "_analyse", forgetful)
    kernel = np.asarray(model.fc1.kernel[...])
    with pytest.raises(RuntimeError, match="outputs differ from the original's.*left unchanged"):
        prune.rearrange_filters(model, SPEC, x)
    assert np.array_equal(model.fc1.kernel[...], kernel)


def test_sparse_layers_are_reported_not_rearranged():
    mlp = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(32, 32, rngs=nnx.Rngs(1)), nnx.relu,
                         nnx.Linear(32, 8, rngs=nnx.Rngs(2)))
    sparse = jsp.nn.sparsify(mlp, "2:4", filter="^layers/2")
    report = prune.rearrange_filters(sparse, SPEC, jnp.ones((2, 16)))
    assert report["layers/2"].skipped.startswith("already sparse (SparseLinear)")
    assert "of the sparse layer layers/2 (SparseLinear: rearrange the dense model, then " \
           "sparsify)" in report["layers/0"].skipped


# ---------------------------------------------------------------------- linen
def test_linen_conv_batchnorm_chain():
    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(16, (3, 3))(x)
            x = linen.BatchNorm(use_running_average=True)(x)
            x = linen.relu(linen.Conv(8, (3, 3))(linen.relu(x)))
            return linen.Dense(4)(x.reshape(x.shape[0], -1))

    net, x = Net(), jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    variables = net.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape) ** 2 + 0.1,
                             variables)
    new, report = prune.rearrange_filters_linen(net, variables, SPEC, x)
    assert_same_function(net.apply(new, x), net.apply(variables, x))
    assert [r.path for r in report.rearranged] == ["params/Conv_0/kernel",
                                                   "params/Conv_1/kernel"]
    assert "batch_stats/BatchNorm_0/mean" in report["params/Conv_0"].companions
    assert report["params/Dense_0"].skipped.startswith("its outputs reach the model's output")
    assert not np.array_equal(new["params"]["Conv_0"]["kernel"],
                              variables["params"]["Conv_0"]["kernel"])


@pytest.mark.parametrize("split", ("out", "in"))
def test_a_balanced_spec_searches_for_the_blocks_each_run_keeps(split):
    # The kept norm of a balanced spec is what its format keeps (each run's largest), and the
    # search raises it on filters in hidden groups as for the whole matrix.
    w = planted(64, 128, 16)
    spec = jsp.Blocks(16, 0.25, shards=4, split=split)
    kept = jsp.fromdense(jnp.asarray(w), spec).todense()
    assert prune.kept_block_norm(w, spec) == pytest.approx(
        float(np.sum(np.asarray(kept, np.float64) ** 2)), rel=1e-6)
    assert prune.kept_block_norm(w, spec) < prune.kept_block_norm(w, jsp.Blocks(16, 0.25))
    moved = prune.apply_output_permutation(w, prune.rearrange_outputs(w, spec))
    assert prune.kept_block_norm(moved, spec) > 1.2 * prune.kept_block_norm(w, spec)
    with pytest.raises(ValueError, match=r"does not fit the kernel folded to \[64, 96\]"):
        prune.rearrange_outputs(w[:, :96], jsp.Blocks(16, 0.25, shards=4))  # 6 block rows.


def test_a_model_rearranged_for_a_balanced_spec_keeps_its_function():
    model = randomize(LinearChain(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 12))
    # fc1 [12, 32] in 4 runs of one block row; fc2 [32, 16] has 2 block rows: skipped, with why.
    report = check_preserved(model, x, spec="1x8@0.5,shards=4")
    assert report["fc1/kernel"].skipped is None
    assert report["fc1/kernel"].kept_after >= report["fc1/kernel"].kept_before
    assert "multiple of n*shards=32" in report["fc2/kernel"].skipped
