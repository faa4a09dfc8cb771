"""Weight formats, one file each: registered pytrees in a canonical, device-neutral layout.

`_base.SparseFormat` is the seam (array roles, pytree registration, `x @ w`); `_spec` is the one
registry of specs (`NM`, `VNM`, `Blocks`, `Int4`, ...) with `as_spec`, `fromdense` and `frommask`.
"""

from jaxsparse.formats._base import FROZEN, TRAINABLE, SparseFormat
from jaxsparse.formats._spec import as_spec, frommask, fromdense, registered_specs
from jaxsparse.formats.nm import NM, NMSparse
from jaxsparse.formats.blocks import Blocks, BlocksSparse
from jaxsparse.formats.int4 import Int4, Int4NMWeight, Int4Weight
from jaxsparse.formats.int4_lines import Int4LinesWeight, Int4NMLinesWeight
from jaxsparse.formats.int4_marlin import Int4MarlinWeight, Int4NMMarlinWeight
from jaxsparse.formats.vnm import VNM, VNMSparse, VNMSparseTiled

__all__ = [
    "Blocks",
    "BlocksSparse",
    "FROZEN",
    "Int4",
    "Int4LinesWeight",
    "Int4NMLinesWeight",
    "Int4MarlinWeight",
    "Int4NMMarlinWeight",
    "Int4NMWeight",
    "Int4Weight",
    "NM",
    "NMSparse",
    "SparseFormat",
    "TRAINABLE",
    "VNM",
    "VNMSparse",
    "VNMSparseTiled",
    "as_spec",
    "fromdense",
    "frommask",
    "registered_specs",
]
