"""Compressed BERT encoders round-trip through orbax: a fresh process rebuilds each variant
abstractly (examples/bert.py `load_checkpoint`), restores it and encodes exactly what the saved
model encoded. A small random BERT (2 layers, 128 wide), so no package model is needed."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("orbax.checkpoint")

import jaxsparse as jsp  # noqa: E402
from examples.bert import BertConfig, BertEncoder, load_checkpoint, save_checkpoint  # noqa: E402
from jaxsparse import prune  # noqa: E402

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIG = BertConfig(vocab_size=64, hidden=128, layers=2, heads=4, intermediate=256,
                    max_positions=16)
# (name, spec string or None for dense, how): "magnitude" is sparsify's own rule; "one-shot" holds
# the weights of jaxsparse.prune.one_shot (SparseGPT / GPTQ) in the layers.
# One variant per stored format (a second way to fill the same format checks nothing more here).
VARIANTS = [
    ("dense", None, None),
    ("2:4", "2:4", "magnitude"),
    ("64:2:8", "64:2:8", "one-shot"),
    ("1x16@0.5", "1x16@0.5", "one-shot"),
    ("int4 g128 GPTQ", "int4:g128", "one-shot"),
    ("int4+2:4", "int4:g128+2:4", "one-shot"),
]

_CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from bert import BertConfig, load_checkpoint
root = sys.argv[2]
manifest = json.load(open(root + "/manifest.json"))
inputs = np.load(root + "/inputs.npz")
config = BertConfig(**manifest["config"])
for i, entry in enumerate(manifest["variants"]):
    model = load_checkpoint(root + "/" + str(i), entry["spec"], config)
    np.save(root + "/restored-" + str(i) + ".npy",
            np.asarray(model.encode(inputs["ids"], inputs["mask"])))
"""


def batch(seed, b=3, t=11):
    rng = np.random.default_rng(seed)
    mask = np.arange(t)[None] < rng.integers(4, t + 1, (b, 1))
    return jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, t)), jnp.int32), jnp.asarray(mask)


def compress(model, spec, how, batches):
    if how is None:
        return model
    if how == "magnitude":
        return jsp.nn.sparsify(model, spec)
    weights = prune.one_shot(model, batches, jsp.as_spec(spec), progress=False)
    return jsp.nn.sparsify(model, spec, method=weights)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every variant saved with orbax, with its embeddings of `inputs.npz`."""
    root = tmp_path_factory.mktemp("bert")
    model = BertEncoder(CONFIG, rngs=nnx.Rngs(0))
    calibration = [batch(seed) for seed in range(4)]
    ids, mask = batch(99)
    np.savez(root / "inputs.npz", ids=np.asarray(ids), mask=np.asarray(mask))
    expected = []
    for i, (_, spec, how) in enumerate(VARIANTS):
        variant = compress(model, spec, how, calibration)
        save_checkpoint(variant, root / str(i))
        expected.append(np.asarray(variant.encode(ids, mask)))
    (root / "manifest.json").write_text(json.dumps(
        {"config": CONFIG._asdict(), "variants": [{"spec": s} for _, s, _ in VARIANTS]}))
    return root, expected


def test_every_variant_encodes_identically_in_a_fresh_process(saved):
    root, expected = saved
    subprocess.run([sys.executable, "-c", _CHILD, str(EXAMPLES), str(root)], check=True,
                   timeout=600)
    for i, (name, _, _) in enumerate(VARIANTS):
        restored = np.load(root / f"restored-{i}.npy")
        assert restored.dtype == np.float32 and np.all(np.isfinite(restored)), name
        np.testing.assert_array_equal(restored.view(np.uint32), expected[i].view(np.uint32),
                                      err_msg=name)


def test_the_restored_layers_hold_the_saved_format(saved):
    root, _ = saved
    int4_sparse = load_checkpoint(root / str(len(VARIANTS) - 1), "int4:g128+2:4", CONFIG)
    layer = int4_sparse.layers[0].intermediate
    assert isinstance(layer, jsp.nn.SparseLinear)
    assert isinstance(layer.weight, jsp.Int4NMWeight), type(layer.weight)
    dense = load_checkpoint(root / "0", None, CONFIG)
    assert isinstance(dense.layers[1].output, nnx.Linear)

