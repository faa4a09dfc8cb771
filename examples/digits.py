"""Train an MLP and a CNN on scikit-learn's digits, prune them (N:M, V:N:M, int4; 1xN blocks for
the CNN), compare with dense.

    python examples/digits.py [--quick] [--out digits_sparsity.png] [--hidden 1024]

Everything runs in this one process on scikit-learn's bundled digits (8x8 images, no download),
with a fixed train/test split and fixed seeds:

1. a dense MLP 64 -> H -> H -> 10 is trained under `jax.jit` with optax's adam;
2. "magnitude": each kernel is pruned to 2:4 by magnitude (`jaxsparse.nn.sparsify`), then the
   `SparseLinear` layers are fine-tuned under `jax.jit`;
3. "permuted magnitude": the same after a channel-permutation search on the hidden layers' inputs
   (`jaxsparse.prune.search_permutation`), which leaves the network's function unchanged and keeps
   more magnitude;
4. "SR-STE": a model trained from scratch through 2:4-pruned kernels (`srste_weights` in the
   forward pass, the `srste` decay in the optimizer), then converted to `SparseLinear` layers;
5. the sweep 1:4, 2:8 and 4:8 by magnitude + fine-tune;
6. V:N:M (VENOM: panels of v outputs share 4 of every m inputs, n of those 4 kept per output)
   64:2:8 (75% sparse), 128:2:16 (87.5%) and 64:2:32 (93.75%) by magnitude + fine-tune;
7. int4 (MARLIN's numbers) and int4 + 2:4 (Sparse-MARLIN's): each kernel quantised by
   round-to-nearest with a scale per 128 inputs (the first layer's 64 pixel inputs: one scale
   per column), the codes and scales frozen; "one-shot" is the quantised model, "test acc" after
   fine-tuning the biases only (what trains beside a frozen int4 base);
8. a small CNN (three 3x3 convolutions and a linear classifier) trained dense, its last two
   convolutions and its classifier pruned to 1xN blocks (`jaxsparse.Blocks(8, 0.25)`: blocks of
   one input by 8 consecutive output channels, 75% of them pruned, by block norm) and fine-tuned
   with the blocks fixed (`jaxsparse.nn.sparsify` turns each `nnx.Conv` into a
   `jaxsparse.nn.SparseConv`), once as trained and once after filter rearrangement
   (`jaxsparse.prune.rearrange_filters`: output channels reordered so that filters large on the
   same inputs share blocks, the next layer's inputs to match; the network's function unchanged).

It prints a table of sparsity, test accuracy, the weights' bytes, training-step time and inference
time against dense (medians of interleaved runs after warm-up), and writes a PNG plot of accuracy
against sparsity.
All three Linear layers are pruned, the first (64 pixel inputs) and the classifier included; the
permutation acts on the inputs of the second and third (the first layer's inputs are the pixels).
Exits non-zero when something is clearly wrong: a dense accuracy below 0.9, a non-finite loss, a
permutation that changes the network's function, or sparse weights that break their pattern
(the same for the CNN: dense accuracy, losses, rearrangement).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxsparse as jsp
from jaxsparse import prune

matplotlib.use("Agg")  # Files only: no display needed (CI, ssh).
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

SEED = 0
BATCH = 128
LEARNING_RATE = 1e-3
SWEEP = (jsp.NM(1, 4), jsp.NM(2, 4), jsp.NM(2, 8), jsp.NM(4, 8))
VNM_SWEEP = (jsp.VNM(64, 2, 8), jsp.VNM(128, 2, 16), jsp.VNM(64, 2, 32))
MIN_DENSE_ACCURACY = 0.9
INT4_SPECS = (jsp.Int4(128), jsp.Int4(128, jsp.NM(2, 4)), jsp.Int4(128, activations="int8"))
CNN_SPEC = jsp.Blocks(8, 0.25)
# The layers pruned to 1xN: the first convolution (9 pixel inputs per filter, 144 weights) stays
# dense, as in Lin et al.'s CNNs.
CNN_PRUNED = ("conv2", "conv3", "head")


@dataclasses.dataclass(frozen=True)
class Settings:
    hidden: int
    dense_steps: int
    finetune_steps: int
    timing_rounds: int
    timing_repeats: int
    cnn_steps: int
    cnn_finetune_steps: int


@dataclasses.dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclasses.dataclass
class Trained:
    """A trained model and the jitted step that trained it, with arguments to time it again."""

    model: nnx.Module
    step: Callable
    step_args: tuple


@dataclasses.dataclass
class Row:
    method: str
    pattern: jsp.NM | jsp.VNM | jsp.Int4 | None
    model: nnx.Module
    trained: Trained
    accuracy: float
    one_shot_accuracy: float | None = None
    step_ms: float = float("nan")
    infer_ms: float = float("nan")

    @property
    def sparsity(self) -> float:
        return weight_sparsity(self.model)

    @property
    def weight_kb(self) -> float:
        return weight_bytes(self.model) / 1024


class MLP(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(64, hidden, rngs=rngs),
                nnx.Linear(hidden, hidden, rngs=rngs),
                nnx.Linear(hidden, 10, rngs=rngs),
            ]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    """8x8x1 -> conv 3x3, 16 -> conv 3x3 stride 2, 32 -> conv 3x3, 64 -> linear 1024 -> 10.

    It takes the MLP's flat standardised pixels `[batch, 64]` and reshapes them to images.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.conv3 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 64, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(*x.shape[:-1], 8, 8, 1)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nnx.relu(conv(x))
        return self.head(x.reshape(*x.shape[:-3], -1))


# ---------------------------------------------------------------------- data
def load_data() -> Data:
    """Digits, stratified 75/25 split, standardised with the training set's statistics."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # Pixels that are blank in every training image.

    def scale(x):
        return ((x - mean) / std).astype(np.float32)

    return Data(scale(x_train), y_train.astype(np.int32), scale(x_test), y_test.astype(np.int32))


def batch_indices(size: int, steps: int, seed: int) -> np.ndarray:
    """`[steps, BATCH]` indices: shuffled epochs, concatenated."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * BATCH // size)
    order = np.concatenate([rng.permutation(size) for _ in range(epochs)])
    return order[: steps * BATCH].reshape(steps, BATCH)


# ---------------------------------------------------------------------- training
@functools.partial(jax.jit, static_argnums=0)
def logits(graphdef, params, rest, x):
    return nnx.merge(graphdef, params, rest)(x)


def identity(params):
    return params


def make_train_step(graphdef, tx, weights_fn=identity):
    """A jitted adam step on the `nnx.Param`s; `weights_fn` maps them to what the forward uses."""

    def loss_fn(params, rest, x, y):
        out = nnx.merge(graphdef, weights_fn(params), rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    @jax.jit
    def step(params, opt_state, rest, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(model, data: Data, steps: int, desc: str, tx=None, weights_fn=identity) -> Trained:
    """Train `model`'s `nnx.Param`s (dense kernels, or a SparseLinear's kept values)."""
    tx = tx or optax.adam(LEARNING_RATE)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = make_train_step(graphdef, tx, weights_fn)
    opt_state = tx.init(params)
    bar = tqdm(batch_indices(len(data.y_train), steps, SEED), desc=desc, leave=False, disable=None)
    for i, idx in enumerate(bar):
        x, y = data.x_train[idx], data.y_train[idx]
        params, opt_state, loss = step(params, opt_state, rest, x, y)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    require(np.isfinite(float(loss)), f"{desc}: the training loss is {float(loss)}")
    batch = (data.x_train[:BATCH], data.y_train[:BATCH])
    return Trained(nnx.merge(graphdef, params, rest), step, (params, opt_state, rest, *batch))


def accuracy(model, data: Data) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    predicted = jnp.argmax(logits(graphdef, params, rest, data.x_test), axis=-1)
    return float(jnp.mean(predicted == data.y_test))


# ---------------------------------------------------------------------- methods
def dense_row(data: Data, settings: Settings) -> Row:
    model = MLP(settings.hidden, rngs=nnx.Rngs(SEED))
    trained = train(model, data, settings.dense_steps, "dense")
    row = Row("dense", None, trained.model, trained, accuracy(trained.model, data))
    require(
        row.accuracy >= MIN_DENSE_ACCURACY,
        f"the dense model's test accuracy {row.accuracy:.3f} is below {MIN_DENSE_ACCURACY}",
    )
    return row


def finetuned_row(method: str, dense, pattern, data: Data, settings: Settings) -> Row:
    """Prune every layer of `dense` by magnitude to SparseLinear, then fine-tune the kept values."""
    sparse = jsp.nn.sparsify(dense, pattern)
    trained = train(sparse, data, settings.finetune_steps, f"{method} {pattern}")
    return checked_row(
        Row(method, pattern, trained.model, trained, accuracy(trained.model, data),
            one_shot_accuracy=accuracy(sparse, data))
    )


def srste_row(pattern: jsp.NM, data: Data, settings: Settings) -> Row:
    """Train from scratch through pruned kernels (SR-STE), then convert to SparseLinear layers."""
    model = MLP(settings.hidden, rngs=nnx.Rngs(SEED))
    tx = optax.chain(prune.srste(pattern), optax.adam(LEARNING_RATE))
    trained = train(
        model, data, settings.dense_steps, f"SR-STE {pattern}", tx=tx,
        weights_fn=lambda params: prune.srste_weights(params, pattern),
    )
    sparse = jsp.nn.sparsify(trained.model, pattern)  # The same magnitude mask as the forward.
    return checked_row(Row("SR-STE", pattern, sparse, trained, accuracy(sparse, data)))


def int4_row(dense, spec: jsp.Int4, data: Data, settings: Settings) -> Row:
    """Quantise every layer by round-to-nearest (layers whose inputs the group does not divide:
    one scale per column), then fine-tune the biases: the codes and scales are frozen."""
    quantised = jsp.nn.sparsify(dense, spec)
    quantised = jsp.nn.sparsify(quantised, spec._replace(group_size=None))  # The 64-pixel layer.
    trained = train(quantised, data, settings.finetune_steps, f"int4 {spec}")
    return checked_row(
        Row("int4 RTN", spec, trained.model, trained, accuracy(trained.model, data),
            one_shot_accuracy=accuracy(quantised, data))
    )


def permute_hidden_channels(model: MLP, pattern: jsp.NM) -> tuple[MLP, list]:
    """A copy of `model` whose hidden channels are reordered to keep more magnitude under N:M.

    Each hidden layer's inputs are permuted by a searched permutation and its producer's outputs
    by the same one, so the network computes the same function.
    """
    model = nnx.clone(model)
    results = []
    for producer, consumer in zip(model.layers[:-1], model.layers[1:]):
        found = prune.search_permutation(consumer.kernel[...], pattern, seed=SEED)
        consumer.kernel.set_value(prune.permute_inputs(consumer.kernel[...], found.perm))
        kernel, bias = prune.permute_outputs(producer.kernel[...], producer.bias[...], found.perm)
        producer.kernel.set_value(kernel)
        producer.bias.set_value(bias)
        results.append(found)
    return model, results


def permuted_row(dense: MLP, pattern: jsp.NM, data: Data, settings: Settings) -> Row:
    start = time.perf_counter()
    permuted, results = permute_hidden_channels(dense, pattern)
    seconds = time.perf_counter() - start
    before = logits(*nnx.split(dense, nnx.Param, ...), data.x_test)
    after = logits(*nnx.split(permuted, nnx.Param, ...), data.x_test)
    error = float(jnp.max(jnp.abs(after - before)) / jnp.max(jnp.abs(before)))
    require(error < 1e-5, f"the permutation changed the network's outputs (max rel. {error:.1e})")
    print(f"channel permutation for {pattern} ({seconds:.1f} s): outputs unchanged "
          f"(max rel. difference {error:.1e}); kept magnitude by magnitude pruning:")
    for i, found in enumerate(results, start=2):
        print(f"  layer {i} inputs: {found.kept_before:.2%} -> {found.kept_after:.2%}")
    return finetuned_row("permuted magnitude", permuted, pattern, data, settings)


# ---------------------------------------------------------------------- the CNN, 1xN
@dataclasses.dataclass
class CnnRow:
    method: str
    kept: float | None = None  # of the pruned layers' squared norm, by the 1xN mask
    one_shot_accuracy: float | None = None
    accuracy: float = float("nan")


def kept_fraction(model: CNN) -> float:
    """The squared norm that 1xN magnitude pruning keeps of the pruned layers' kernels."""
    kernels = [getattr(model, name).kernel[...] for name in CNN_PRUNED]
    kept = sum(prune.kept_block_norm(k, CNN_SPEC) for k in kernels)
    return kept / sum(float(jnp.sum(jnp.square(k))) for k in kernels)


def cnn_pruned_row(method: str, dense: CNN, data: Data, settings: Settings) -> CnnRow:
    """Prune the CNN's CNN_PRUNED layers to 1xN by block norm (`SparseConv`, `SparseLinear`) and
    fine-tune: only the kept blocks' values train, so the blocks stay fixed."""
    sparse = jsp.nn.sparsify(dense, CNN_SPEC, filter=f"^({'|'.join(CNN_PRUNED)})$")
    kinds = {name: type(getattr(sparse, name)).__name__ for name in ("conv1", *CNN_PRUNED)}
    expected = {"conv1": "Conv", "conv2": "SparseConv", "conv3": "SparseConv",
                "head": "SparseLinear"}
    require(kinds == expected, f"{method}: unexpected layers after sparsify: {kinds}")
    trained = train(sparse, data, settings.cnn_finetune_steps, f"CNN {method}")
    tuned = jsp.nn.densify(trained.model)
    for name in CNN_PRUNED:  # Fine-tuning moved the kept blocks' values, never the blocks.
        kernel = getattr(tuned, name).kernel[...]
        flat = kernel.reshape(-1, kernel.shape[-1])
        kept = jnp.where(prune.magnitude_mask(flat, CNN_SPEC), flat, 0)
        require(bool(jnp.array_equal(kept, flat)),
                f"CNN {method}: {name}'s weights break the {CNN_SPEC} pattern")
    return CnnRow(method, kept_fraction(dense), accuracy(sparse, data),
                  accuracy(trained.model, data))


def cnn_rows(data: Data, settings: Settings) -> list[CnnRow]:
    """Dense, 1xN pruned + fine-tuned, and the same after filter rearrangement."""
    trained = train(CNN(rngs=nnx.Rngs(SEED)), data, settings.cnn_steps, "CNN dense")
    dense = trained.model
    rows = [CnnRow("dense", accuracy=accuracy(dense, data))]
    require(rows[0].accuracy >= MIN_DENSE_ACCURACY,
            f"the dense CNN's test accuracy {rows[0].accuracy:.3f} is below {MIN_DENSE_ACCURACY}")
    rows.append(cnn_pruned_row("1xN", dense, data, settings))
    rearranged = nnx.clone(dense)
    start = time.perf_counter()
    # Only the layers to be pruned: their output channels are what 1xN blocks group (the
    # classifier's outputs are the logits, which the report lists as left alone).
    report = prune.rearrange_filters(rearranged, {name: CNN_SPEC for name in CNN_PRUNED},
                                     data.x_test[:16])
    seconds = time.perf_counter() - start
    before = logits(*nnx.split(dense, nnx.Param, ...), data.x_test)
    after = logits(*nnx.split(rearranged, nnx.Param, ...), data.x_test)
    error = float(jnp.max(jnp.abs(after - before)) / jnp.max(jnp.abs(before)))
    require(error < 1e-5, f"filter rearrangement changed the CNN's outputs (max rel. {error:.1e})")
    require(len(report.rearranged) >= 2,
            f"filter rearrangement left conv2 or conv3 alone:\n{report}")
    print(f"\nCNN filter rearrangement ({seconds:.1f} s): outputs unchanged (max rel. difference "
          f"{error:.1e})")
    print(report)
    rows.append(cnn_pruned_row("1xN rearranged", rearranged, data, settings))
    return rows


def print_cnn_table(rows: list[CnnRow], data: Data) -> None:
    print()
    print(f"CNN conv 3x3 1->16, 3x3/2 16->32, 3x3 32->64, linear 1024->10 on digits "
          f"({len(data.y_train)} train / {len(data.y_test)} test images); "
          f"{', '.join(CNN_PRUNED)} pruned to {CNN_SPEC} (1xN blocks along the output channels)")
    head = f"{'method':<16} {'pattern':>9} {'kept norm':>9} {'one-shot':>8} {'test acc':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        pruned = row.kept is not None
        print(f"{row.method:<16} {str(CNN_SPEC) if pruned else '-':>9} "
              f"{f'{row.kept:.2%}' if pruned else '-':>9} "
              f"{f'{row.one_shot_accuracy:.2%}' if pruned else '-':>8} {row.accuracy:>8.2%}")
    print("kept norm: the squared norm of the pruned kernels the blocks keep; one-shot: test "
          "accuracy after pruning, before fine-tuning the kept blocks")


# ---------------------------------------------------------------------- checks
def require(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"examples/digits.py: {message}")


def dense_kernels(model) -> list[jax.Array]:
    """Each layer's `[in, out]` kernel, zeros where pruned."""
    return [layer.kernel[...] for layer in jsp.nn.densify(model).layers]


def weight_sparsity(model) -> float:
    kernels = dense_kernels(model)
    zeros = sum(int(jnp.sum(k == 0)) for k in kernels)
    return zeros / sum(k.size for k in kernels)


def weight_bytes(model) -> int:
    """Bytes of the layers' weights as held: dense kernels, or a format's arrays."""
    total = 0
    for layer in model.layers:
        held = layer.kernel[...] if isinstance(layer, nnx.Linear) else layer.weight
        total += held.nbytes
    return total


def checked_row(row: Row) -> Row:
    """The row, once its model's weights are checked against its pattern (N:M or V:N:M)."""
    for i, kernel in enumerate(dense_kernels(row.model), start=1):
        kept = jnp.where(prune.magnitude_mask(kernel, row.pattern), kernel, 0)
        require(
            bool(jnp.array_equal(kept, kernel)),
            f"{row.method} {row.pattern}: layer {i}'s weights break the {row.pattern} pattern",
        )
    return row


# ---------------------------------------------------------------------- timing
def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # Warm-up: compile outside the timing.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_rows(rows: list[Row], data: Data, settings: Settings) -> None:
    """Each row's training step (on one batch) and inference (the test set), interleaved.

    Rounds go over all rows in turn, so the shared machine's load hits every row alike; each
    time is the median over rounds of per-round medians.
    """
    forward_args = [(*nnx.split(row.model, nnx.Param, ...), data.x_test) for row in rows]
    step_ms, infer_ms = [[] for _ in rows], [[] for _ in rows]
    for _ in tqdm(range(settings.timing_rounds), desc="timing", leave=False, disable=None):
        for i, row in enumerate(rows):
            trained = row.trained
            step_ms[i].append(median_ms(trained.step, trained.step_args, settings.timing_repeats))
            infer_ms[i].append(median_ms(logits, forward_args[i], settings.timing_repeats))
    for row, steps, infers in zip(rows, step_ms, infer_ms):
        row.step_ms, row.infer_ms = statistics.median(steps), statistics.median(infers)


# ---------------------------------------------------------------------- report
def print_table(rows: list[Row], data: Data, settings: Settings) -> None:
    dense = rows[0]
    h = settings.hidden
    print()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, jaxsparse CPU kernels: {jsp.cpu_isa()}")
    print(f"MLP 64 -> {h} -> {h} -> 10 on digits ({len(data.y_train)} train / "
          f"{len(data.y_test)} test images); all three Linear layers pruned, along inputs")
    print(f"step: one adam step on a batch of {BATCH}; infer: the forward pass on the test set;")
    print("median ms, and /dense = time / dense time (below 1: faster than dense)")
    head = (f"{'method':<19} {'pattern':>13} {'sparsity':>8} {'one-shot':>8} {'test acc':>8} "
            f"{'weight KB':>9}  {'step ms':>8} {'/dense':>6}  {'infer ms':>8} {'/dense':>6}")
    print(head)
    print("-" * len(head))
    for row in rows:
        one_shot = "-" if row.one_shot_accuracy is None else f"{row.one_shot_accuracy:.2%}"
        print(f"{row.method:<19} {str(row.pattern or '-'):>13} {row.sparsity:>8.2%} "
              f"{one_shot:>8} {row.accuracy:>8.2%} {row.weight_kb:>9.0f}  "
              f"{row.step_ms:>8.2f} {row.step_ms / dense.step_ms:>5.2f}x  "
              f"{row.infer_ms:>8.2f} {row.infer_ms / dense.infer_ms:>5.2f}x")
    print("one-shot: test accuracy right after magnitude pruning (int4: quantisation), before "
          "fine-tuning")
    print("int4 rows: the first layer (64 inputs) has one scale per column; only biases train")
    print("SR-STE's step: its training step, dense kernels pruned in the forward pass")


PLOT_STYLE = {  # method -> (legend label, colour, marker, size: larger ones drawn first)
    "magnitude": ("magnitude + fine-tune", "tab:blue", "o", 110),
    "permuted magnitude": ("permuted magnitude 2:4 + fine-tune", "tab:green", "*", 80),
    "SR-STE": ("SR-STE 2:4", "tab:red", "D", 40),
    "V:N:M magnitude": ("V:N:M magnitude + fine-tune", "tab:purple", "^", 70),
    "int4 RTN": ("int4 g128 RTN (+2:4) + bias fine-tune", "tab:orange", "P", 70),
    "dense": ("dense", "black", "s", 50),
}


def plot(rows: list[Row], path: str) -> None:
    """Test accuracy against sparsity, one series per method; hollow markers: one-shot."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(rows[0].accuracy, color="grey", linestyle=":", linewidth=1)
    for method, (label, color, marker, size) in PLOT_STYLE.items():
        chosen = [r for r in rows if r.method == method]
        ax.scatter([r.sparsity for r in chosen], [r.accuracy for r in chosen], color=color,
                   marker=marker, s=size, label=label)
        one_shot = [r for r in chosen if r.one_shot_accuracy is not None]
        if one_shot:
            ax.scatter([r.sparsity for r in one_shot], [r.one_shot_accuracy for r in one_shot],
                       facecolors="none", edgecolors=color, marker=marker, s=size,
                       label=f"{label.removesuffix(' + fine-tune')}, one-shot")
    for method, color in (("magnitude", "tab:blue"), ("V:N:M magnitude", "tab:purple"),
                          ("int4 RTN", "tab:orange")):
        names = {}  # The sweep's patterns, one label per point (2:4 and 4:8 may coincide).
        for r in rows:
            if r.method == method:
                for y in (r.accuracy, r.one_shot_accuracy):
                    names.setdefault((r.sparsity, y), []).append(str(r.pattern))
        for xy, patterns in names.items():
            ax.annotate(", ".join(patterns), xy, textcoords="offset points", xytext=(8, -3),
                        fontsize=8, color=color)
    ax.margins(x=0.1)  # Room for the labels right of the 75% points.
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.set_xlabel("sparsity of the weights")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits MLP: N:M, V:N:M and int4 with jaxsparse")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and timing repeats")
    parser.add_argument("--out", default="digits_sparsity.png", help="the PNG plot's path")
    parser.add_argument("--hidden", type=int, default=1024, help="width of the hidden layers")
    return parser.parse_args()


def main():
    args = parse_args()
    settings = (
        Settings(args.hidden, dense_steps=200, finetune_steps=50, timing_rounds=2,
                 timing_repeats=5, cnn_steps=200, cnn_finetune_steps=50)
        if args.quick
        else Settings(args.hidden, dense_steps=800, finetune_steps=300, timing_rounds=3,
                      timing_repeats=15, cnn_steps=400, cnn_finetune_steps=150)
    )
    start = time.perf_counter()
    data = load_data()
    dense = dense_row(data, settings)
    two_four = jsp.NM(2, 4)
    rows = [
        dense,
        finetuned_row("magnitude", dense.model, two_four, data, settings),
        permuted_row(dense.model, two_four, data, settings),
        srste_row(two_four, data, settings),
        *(finetuned_row("magnitude", dense.model, p, data, settings)
          for p in SWEEP if p != two_four),
        *(finetuned_row("V:N:M magnitude", dense.model, p, data, settings) for p in VNM_SWEEP),
        *(int4_row(dense.model, spec, data, settings) for spec in INT4_SPECS),
    ]
    time_rows(rows, data, settings)
    print_table(rows, data, settings)
    plot(rows, args.out)
    print(f"plot: {os.path.abspath(args.out)}")
    print_cnn_table(cnn_rows(data, settings), data)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
