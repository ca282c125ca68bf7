"""The RayService manifest carries cluster/serve/gpu.yaml verbatim as its ``serveConfigV2``.

``python -m coact.cluster.kuberay --write`` copies gpu.yaml into the manifest (between its BEGIN/END markers);
``--check`` (the default; also tests/test_configs.py) exits 1 and prints the differing lines while the two differ.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "rayservice.yaml"
SERVE_CONFIG = HERE.parent / "serve" / "gpu.yaml"
BEGIN, END = "# --- BEGIN cluster/serve/gpu.yaml ---", "# --- END cluster/serve/gpu.yaml ---"


def render(manifest: str | None = None, serve_config: str | None = None) -> str:
    """The manifest text with the block between the markers replaced by gpu.yaml, indented like the markers."""
    manifest = MANIFEST.read_text() if manifest is None else manifest
    serve_config = SERVE_CONFIG.read_text() if serve_config is None else serve_config
    lines = manifest.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    body = [f"{indent}{line}".rstrip() + "\n" if line.strip() else "\n" for line in serve_config.splitlines()]
    return "".join(lines[: begin + 1] + body + lines[end:])


def main(argv: list[str] | None = None) -> int:
    import argparse
    import difflib

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when the manifest's serveConfigV2 differs from gpu.yaml (the default)")
    mode.add_argument("--write", action="store_true", help="rewrite the manifest's serveConfigV2 from gpu.yaml")
    args = p.parse_args(argv)
    current, wanted = MANIFEST.read_text(), render()
    if current == wanted:
        print(f"{MANIFEST} is in sync with {SERVE_CONFIG}")
        return 0
    if args.write:
        MANIFEST.write_text(wanted)
        print(f"rewrote serveConfigV2 of {MANIFEST} from {SERVE_CONFIG}")
        return 0
    diff = difflib.unified_diff(current.splitlines(), wanted.splitlines(), "rayservice.yaml (now)",
                                "rayservice.yaml (from gpu.yaml)", n=1, lineterm="")
    print("\n".join(diff))
    print(f"{MANIFEST} differs from {SERVE_CONFIG}: run python -m coact.cluster.kuberay --write")
    return 1
