"""Pruning for jaxsparse, optax-shaped (CONVENTIONS.md 11).

- Patterns are values: `jaxsparse.NM(n, m)`, `Unstructured(density)`; `as_pattern` turns a spec
  (`"2:4"`) into one, `fits` says whether a layer shape can take it.
- Masks are pure, jittable functions: `magnitude_mask`, `magnitude_masks`, `apply_masks`,
  `nm_kept_magnitude`.
- Per-layer patterns: a mapping `{path: pattern}` goes wherever a pattern does;
  `block_densities` spreads one 1xN density over a model with a global block-norm threshold.
- Channel permutations for N:M: `search_permutation`, `permute_inputs`, `permute_outputs`.
- Filter rearrangement for 1xN blocks (`jaxsparse.Blocks`): `rearrange_outputs` and
  `kept_block_norm` for one kernel, `apply_output_permutation` / `apply_input_permutation`,
  and `rearrange_filters` (nnx, in place) / `rearrange_filters_linen` for a whole model, with a
  `RearrangeReport`.
- Second-order one-shot compression of one layer from its inputs' Gram matrix `X^T X`:
  `sparsegpt(w, gram, spec)` (SparseGPT/OBS for N:M, V:N:M, 1xN blocks, unstructured, and
  2:4 + int4; sparse specs then re-solve their kept weights for the final mask, `refit`) and
  `gptq(w, gram, jaxsparse.Int4(...))`, each returning the spec's format;
  `calibrate` (nnx) / `calibrate_linen` sum each dense layer's input Gram (`GramStats`) over
  calibration batches, and `one_shot` compresses a whole nnx model (one pass, or `sequential`
  as the SparseGPT paper) into `{path: weight}` for `jaxsparse.nn.sparsify(..., method=)`.
- Schedules are optax schedules: `cubic_schedule`.
- Training algorithms are `optax.GradientTransformation`s with NamedTuple states:
  `gradual_pruning`, `masked`, `srste` (with `srste_weight` / `srste_weights` in the forward pass).

    >>> import jax, optax
    >>> from jaxsparse import prune
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}}
    >>> tx = optax.chain(optax.adam(1e-3), prune.masked(prune.magnitude_masks(params, "2:4")))
"""

from jaxsparse.formats.nm import NM
from jaxsparse.prune._calibrate import GramStats, calibrate, calibrate_linen, one_shot
from jaxsparse.prune._layerwise import block_densities
from jaxsparse.prune._masks import magnitude_mask, magnitude_masks, nm_kept_magnitude
from jaxsparse.prune._patterns import Pattern, Unstructured, as_pattern, fits
from jaxsparse.prune._permutation import (
    PermutationResult,
    permute_inputs,
    permute_outputs,
    search_permutation,
)
from jaxsparse.prune._rearrange import (
    LayerRearrangement,
    RearrangeReport,
    apply_input_permutation,
    apply_output_permutation,
    kept_block_norm,
    rearrange_filters,
    rearrange_filters_linen,
    rearrange_outputs,
)
from jaxsparse.prune._schedules import cubic_schedule
from jaxsparse.prune._sparsegpt import gptq, sparsegpt
from jaxsparse.prune._srste import SRSTEState, srste, srste_weight, srste_weights
from jaxsparse.prune._transforms import GradualPruningState, MaskedState, gradual_pruning, masked
from jaxsparse.prune._tree import Filter, apply_masks

__all__ = [
    "NM",
    "Filter",
    "GramStats",
    "GradualPruningState",
    "LayerRearrangement",
    "MaskedState",
    "Pattern",
    "PermutationResult",
    "RearrangeReport",
    "SRSTEState",
    "Unstructured",
    "apply_input_permutation",
    "apply_masks",
    "apply_output_permutation",
    "as_pattern",
    "block_densities",
    "calibrate",
    "calibrate_linen",
    "cubic_schedule",
    "fits",
    "gptq",
    "gradual_pruning",
    "kept_block_norm",
    "magnitude_mask",
    "magnitude_masks",
    "masked",
    "nm_kept_magnitude",
    "one_shot",
    "permute_inputs",
    "permute_outputs",
    "rearrange_filters",
    "rearrange_filters_linen",
    "rearrange_outputs",
    "search_permutation",
    "sparsegpt",
    "srste",
    "srste_weight",
    "srste_weights",
]
