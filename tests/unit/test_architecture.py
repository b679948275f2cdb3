"""The import direction of doc/architecture.md, checked on the source.

VM state flows one way: the faces (domain sockets, control channel) import
the state package, which imports the stores (cache, upstream); never the
reverse, and neither the domain sockets nor the domain views import the
upstream at all (they see it through the sinks). Below them sit the shared
vocabulary (model, errors, interfaces, status), the utilities and the
private-API shims; the daemon's assembly may import anything, and nothing
but the twistd entry points imports it.

A failure names the offending import (file, line, what it imports).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PACKAGE = os.path.join(ROOT, "xguard")

#: Layer of each top-level part of the package.
LAYERS = {
    "_internals": "internals",
    "model": "vocabulary", "errors": "vocabulary", "interfaces": "vocabulary",
    "status": "vocabulary", "": "vocabulary",  # xguard/__init__.py (__version__)
    "util": "util",
    "upstream": "stores", "cache": "stores",
    "state": "state",
    "restart": "restart",
    "domain": "faces", "control": "faces",
    "daemon": "daemon", "tap": "daemon", "__main__": "daemon",
    "testing": "testing",
}

#: What each layer may import (besides itself).
ALLOWED = {
    "internals": set(),
    "vocabulary": {"internals"},
    "util": {"vocabulary", "internals"},
    "stores": {"vocabulary", "util", "internals"},
    "state": {"vocabulary", "util", "internals", "stores"},
    "restart": {"vocabulary", "util", "internals"},
    "faces": {"vocabulary", "util", "internals", "state", "restart"},
    "daemon": {"vocabulary", "util", "internals", "stores", "state", "restart", "faces"},
    "testing": {"vocabulary", "util", "internals", "stores", "state", "restart", "faces"},
}

#: Finer rules, by module prefix: (importer, imported) pairs that are refused
#: although their layers allow them.
FORBIDDEN = [
    ("xguard.domain", "xguard.upstream"),
    ("xguard.domain", "xguard.cache"),
    ("xguard.state.views", "xguard.upstream"),
    ("xguard.state.views", "xguard.cache"),
    ("xguard.state.contents", "xguard.upstream"),
    ("xguard.state.contents", "xguard.cache"),
    ("xguard.cache", "xguard.upstream"),
    ("xguard.upstream", "xguard.cache"),
    ("xguard.control", "xguard.domain"),
    ("xguard.domain", "xguard.control"),
]


def _modules() -> Iterator[tuple[str, str]]:
    for top, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(top, name)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                yield ".".join(rel), path


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _imports(module: str, path: str, read: Callable[[str], str]) -> Iterator[tuple[int, str]]:
    """(line, absolute module) of every xguard import in ``path``."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(read(path), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield node.lineno, full if _is_module(full) else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isdir(path) or os.path.exists(path + ".py")


def _layer(module: str) -> str:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def violations(read: Callable[[str], str] = _read) -> list[str]:
    """Every import against the rules, named (``read`` reads a source file)."""
    found = []
    for module, path in sorted(_modules()):
        layer = _layer(module)
        for line, imported in _imports(module, path, read):
            if imported != "xguard" and not imported.startswith("xguard."):
                continue
            where = f"{os.path.relpath(path, ROOT)}:{line}: {module} imports {imported}"
            target = _layer(imported)
            if target != layer and target not in ALLOWED[layer]:
                found.append(f"{where} ({layer} may not import {target})")
                continue
            for importer, refused in FORBIDDEN:
                if _under(module, importer) and _under(imported, refused):
                    found.append(f"{where} ({importer} may not import {refused})")
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_part_has_a_layer() -> None:
    unknown = sorted({m.split(".")[1] for m, _ in _modules() if "." in m} - set(LAYERS))
    assert not unknown, f"give these parts of xguard a layer: {unknown}"


def test_imports_go_one_way() -> None:
    found = violations()
    assert not found, "imports against the architecture:\n" + "\n".join(found)


@pytest.mark.parametrize("source, message", [
    ("from ..upstream.xapi import XapiUpstream\n",
     "xguard.domain.swtpm imports xguard.upstream.xapi (faces may not import stores)"),
    ("from ..state.views import TpmKeys\n",
     "xguard.cache.cache imports xguard.state.views (stores may not import state)"),
    ("from ..upstream import xapi\n",
     "xguard.state.views imports xguard.upstream.xapi (xguard.state.views may not import "
     "xguard.upstream)"),
])
def test_a_violation_is_named(source: str, message: str) -> None:
    """The check can fail, and says which import is wrong."""
    module = message.split(" ")[0]
    path = os.path.abspath(os.path.join(ROOT, *module.split(".")) + ".py")

    def read(name: str) -> str:
        text = _read(name)
        return source + text if os.path.abspath(name) == path else text

    found = violations(read)
    assert any(message in v for v in found), found


def _mapped_modules() -> set[str]:
    """The modules doc/architecture.md's map names (``pkg/module.py``, or
    a top-level ``module.py``), read from its tables' first column under
    each package's heading."""
    import re

    with open(os.path.join(ROOT, "doc", "architecture.md")) as f:
        text = f.read()
    start = text.index("## Who owns what")
    end = text.index("## Isolation by construction")
    package = ""
    found = set()
    for line in text[start:end].splitlines():
        heading = re.match(r"\*\*`(\w+)/`", line)
        if heading:
            package = heading.group(1)
        elif line.startswith("**"):
            package = ""
        if line.startswith("| `"):
            first = line.split("|")[1]
            for name in re.findall(r"`([\w/]+\.py)`", first):
                found.add(f"{package}/{name}" if package else name)
    return found


def test_the_module_map_follows_the_tree() -> None:
    in_tree = {os.path.relpath(path, PACKAGE) for _, path in _modules()
               if not path.endswith("__init__.py")}
    mapped = _mapped_modules()
    assert sorted(in_tree - mapped) == [], "modules doc/architecture.md does not map"
    assert sorted(mapped - in_tree) == [], "modules doc/architecture.md maps that do not exist"
