"""The API reference (docs/api/*.rst) names every public name, so a new one fails here until it
is documented. `make docs` builds the pages (Sphinx, warnings as errors); this reads their
sources only."""

import importlib
import re
import types
from pathlib import Path

import pytest

import jaxsparse

API = Path(__file__).resolve().parents[1] / "docs" / "api"
# The modules whose __all__ is public API: the package and the submodules users import.
MODULES = ("jaxsparse", "jaxsparse.formats", "jaxsparse.ops", "jaxsparse.nn", "jaxsparse.linen",
           "jaxsparse.prune", "jaxsparse.mixed_precision", "jaxsparse.io")
DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:module|class|function|data|exception)|py:(?:module|class|function|data"
    r"|exception|currentmodule)|currentmodule)::\s*(\S+)", re.M)


def documented() -> dict[str, object]:
    """{qualified name: object} of every name an API page documents (autodoc and py: directives,
    relative to the page's current module)."""
    names = {}
    for page in sorted(API.glob("*.rst")):
        module = None
        for match in DIRECTIVE.finditer(page.read_text()):
            directive, name = match.group(0), match.group(1)
            if "module::" in directive:
                module = name
                if "currentmodule" in directive:
                    continue
                qualified = name
            else:
                qualified = name if name.startswith("jaxsparse.") else f"{module}.{name}"
            names[qualified] = resolve(qualified)
    return names


def resolve(qualified: str):
    """The object of a dotted name: the longest importable module, then attributes."""
    parts = qualified.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(qualified)


def test_every_public_name_is_in_the_api_reference():
    docs = documented()
    objects = [obj for obj in docs.values() if callable(obj) or isinstance(obj, types.ModuleType)]
    missing = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            # A re-export documented once under another name (jaxsparse.ops.matmul is
            # jaxsparse.matmul) counts; constants must be documented under their own name.
            shared = (callable(obj) or isinstance(obj, types.ModuleType)) and any(
                obj is other for other in objects)
            if f"{module_name}.{name}" not in docs and not shared:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names missing from docs/api/*.rst: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_module_has_a_page(module_name):
    assert module_name in documented(), f"no `.. automodule:: {module_name}` in docs/api/*.rst"


def test_the_checker_sees_a_missing_name(monkeypatch):
    # The check can fail: a name added to __all__ without a page is reported.
    monkeypatch.setattr(jaxsparse, "__all__", [*jaxsparse.__all__, "__version__"])
    with pytest.raises(AssertionError, match=r"jaxsparse\.__version__"):
        test_every_public_name_is_in_the_api_reference()
