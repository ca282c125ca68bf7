"""Execute a notebook from notebooks/ in a fresh kernel and read its outputs, cell by cell."""

from __future__ import annotations

import os
from dataclasses import dataclass

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOKS = REPO / "notebooks"


@dataclass
class Executed:
    cells: list[tuple[str, list[dict]]]  # (source, outputs) of every code cell, in order

    @property
    def outputs(self) -> list[dict]:
        return [o for _, outs in self.cells for o in outs]

    def cell(self, containing: str) -> list[dict]:
        """The outputs of the one code cell whose source contains `containing`."""
        found = [outs for src, outs in self.cells if containing in src]
        assert len(found) == 1, f"{len(found)} code cells contain {containing!r}"
        return found[0]

    def text(self, containing: str) -> str:
        """The printed text (stdout, then text/plain results) of the one code cell whose source contains `containing`."""
        return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in self.cell(containing))

    def html(self) -> str:
        return "".join(str(o.get("data", {}).get("text/html", "")) for o in self.outputs)

    def images(self, containing: str | None = None) -> list[dict]:
        """The PNG outputs of the whole notebook, or of the one cell whose source contains `containing`."""
        outputs = self.outputs if containing is None else self.cell(containing)
        return [o for o in outputs if "image/png" in o.get("data", {})]


def run_notebook(name: str, monkeypatch: pytest.MonkeyPatch, timeout_s: int) -> Executed:
    # The kernel is its own process: it must import the project from the repository root.
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    run = Executed([(c.source, list(c.get("outputs", []))) for c in nb.cells if c.cell_type == "code"])
    errors = [o for o in run.outputs if o.get("output_type") == "error"]
    assert not errors, [f"{e.get('ename')}: {e.get('evalue')}" for e in errors]
    return run
