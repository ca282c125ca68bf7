"""The layers import downwards only (docs/architecture.md):

    policy core (coact.graphs.policy)  <  engines (coact.actors.*)  <  deployments  <  serving  <  cluster

Read from the source with ``ast`` (every import, also the ones inside functions), so the check costs no
import and fails on the line that breaks a rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"actors": "coact.actors", "graphs": "coact.graphs", "cluster": "coact.cluster"}
DEPLOYMENTS = {f"coact.actors.{m}" for m in ("intent", "reasoner", "decision", "responder", "actions", "session_store",
                                              "audit_log")}
CORE_THIRD_PARTY = {"numpy", "networkx", "pydantic", "yaml"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # "from coact.graphs import serving" imports a module too
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod.startswith("coact")]
    return found


def layer(module: str) -> str:
    if module.startswith("coact.graphs.policy"):
        return "core"
    if module in DEPLOYMENTS:
        return "deployment"
    if module.startswith("coact.actors"):
        return "engine"
    if module.startswith("coact.graphs.serving"):
        return "serving"
    if module.startswith("coact.cluster"):
        return "cluster"
    return "other"


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


def violations(own: dict[str, Path] | None = None) -> list[str]:
    own = modules() if own is None else own
    bad = []
    for name, path in own.items():
        where = layer(name)
        for line, target in imports(path, name):
            top = target.split(".")[0]
            problem = None
            if top in ("actors", "graphs", "cluster"):
                problem = "a top-level module outside the coact namespace"
            elif where == "core" and not (is_stdlib(target) or top in CORE_THIRD_PARTY
                                          or target.startswith("coact.graphs.policy")):
                problem = "the policy core imports only the stdlib, numpy, networkx, pydantic, yaml and itself"
            elif where == "engine" and (top == "ray" or layer(target) in ("deployment", "serving", "cluster")):
                problem = "an engine imports no Ray, deployment, serving or cluster module"
            elif where == "deployment" and layer(target) in ("serving", "cluster"):
                problem = "a deployment imports no serving or cluster module"
            elif where == "serving" and layer(target) == "cluster":
                problem = "the serving layer imports no cluster module"
            if problem:
                bad.append(f"{path.name}:{line}: imports {target}: {problem}")
    return bad


def test_layers_import_downwards_only() -> None:
    assert violations() == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # The rules can fail: lazy imports inside functions count, each reported with its line.
    fake = tmp_path / "bad.py"
    fake.write_text("import numpy\n\ndef f():\n    import ray\n    from coact.actors.intent import IntentActor\n")
    found = violations({"coact.graphs.policy.bad": fake, "coact.actors.bad": fake, "coact.actors.intent": fake})
    assert any(v.startswith("bad.py:4: imports ray: the policy core") for v in found), found
    assert any(v.startswith("bad.py:5: imports coact.actors.intent: an engine") for v in found), found
    assert not any(" imports numpy:" in v for v in found)


def test_no_top_level_actors_graphs_or_cluster_outside_the_checkout(tmp_path: Path) -> None:
    # From another directory (site-packages only), the folders exist only inside the coact namespace.
    code = ("import importlib.util as u; "
            "print([n for n in ('actors', 'graphs', 'cluster') if u.find_spec(n)], "
            "u.find_spec('coact.graphs.policy.decide') is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True"
