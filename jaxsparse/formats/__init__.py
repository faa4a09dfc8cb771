"""Sparse formats, one file each: registered pytrees in a canonical, device-neutral layout."""

from jaxsparse.formats.nm import NM, NMSparse

__all__ = ["NM", "NMSparse"]
