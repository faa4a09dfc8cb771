"""Sphinx configuration: the API reference from the docstrings, and the docs/ pages.

Built by `make docs` (HTML in build/docs/html with warnings as errors, then the pages' doctests);
by hand: `sphinx-build -W --keep-going -b html docs build/docs/html`.
"""

import re

import jaxsparse

project = "jaxsparse"
author = "the jaxsparse authors"
copyright = "the jaxsparse authors, Apache-2.0"
version = release = jaxsparse.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings (CONVENTIONS.md 14)
    "sphinx.ext.doctest",
    "myst_parser",  # the Markdown pages of docs/ and README.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# The docstrings write names and code in single backticks (Markdown's habit, as help() shows
# them): read as inline code. (Not as Python cross-references: short names such as `n` would be
# ambiguous between the specs' fields, a warning.)
default_role = "code"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields of the class, so a NamedTuple's or dataclass's fields are not
# described twice (once there, once by autodoc's members).
napoleon_use_ivar = True
# "Returns:" / "Yields:" as written: the docstrings give the value in prose, often opening with a
# code span such as `{path: GramStats}`, whose colon napoleon would take for "type: description".
napoleon_custom_sections = [("Returns", "prose"), ("Yields", "prose")]

myst_heading_anchors = 3

# The doctest builder runs the pages' `doctest` blocks. The docstrings' own examples are left to
# pytest --doctest-modules (make test), which runs them in their module's namespace.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import jaxsparse as jsp
"""


# Three more of the docstrings' Markdown habits that reStructuredText reads otherwise, mended as
# they are read (rather than in every docstring, where help() shows them as they are meant):
# - a plural after a code span, `nnx.Param`s: the span must end before a non-letter, so an
#   escaped space (`nnx.Param`\ s, which renders as nothing) goes in between;
# - absolute values, |w|: a substitution reference to reStructuredText, so the bars are escaped
#   (outside code spans and math);
# - one description for several names (`n, m: the pattern`): a field `:ivar n, m:` would read as
#   the name `m` of type `n,`, so the names are joined without the space (`n,m`).
_SPAN = re.compile(r"``.*?``|`[^`]*`", re.S)  # code spans, paired from the left, across lines
_ABS = re.compile(r"\|(\w[^|`\s]*)\|")
_MATH = re.compile(r"^([ \t]*)\.\. math::.*(?:\n(?:[ \t]*(?=\n)|\1[ \t]+\S.*))*", re.M)
_FIELD = re.compile(r"^([ \t]*:(?:param|ivar|var|cvar) )([^:\n]+, [^:\n]+):", re.M)


def _mend(text: str) -> str:
    # `.. math::` blocks are LaTeX, where |w| means what it says: left as they are.
    out, pos = [], 0
    for block in _MATH.finditer(text):
        out += [_mend_prose(text[pos:block.start()]), block.group()]
        pos = block.end()
    out.append(_mend_prose(text[pos:]))
    return "".join(out)


def _mend_prose(text: str) -> str:
    text = _FIELD.sub(lambda m: m.group(1) + m.group(2).replace(", ", ",") + ":", text)
    out, pos = [], 0
    for span in _SPAN.finditer(text):
        out += [_ABS.sub(r"\\|\1\\|", text[pos:span.start()]), span.group()]
        pos = span.end()
        if text[pos:pos + 1].isalnum():
            out.append("\\ ")
    out.append(_ABS.sub(r"\\|\1\\|", text[pos:]))
    return "".join(out)


def _mend_docstring(app, what, name, obj, options, lines):
    lines[:] = _mend("\n".join(lines)).split("\n")


def _skip_member(app, what, name, obj, skip, options):
    # A NamedTuple's fields: their docstrings are only "Alias for field number i"; the class's
    # "Attributes:" section describes them, and its signature lists them.
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _mend_docstring)
    app.connect("autodoc-skip-member", _skip_member)


html_theme = "alabaster"
html_theme_options = {"page_width": "1160px"}  # the speed tables are wide
html_title = f"jaxsparse {release}"
html_static_path = []
