"""schemathesis over the served /openapi.json, every check on (tests/schemathesis.toml says where the expected
statuses are widened and why): no server error, every status and content type declared, schema-valid requests
accepted and invalid ones rejected, the streaming routes declared as text/event-stream. Also the body limit
for a chunked body (no Content-Length to check up front)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.data import require_module

pytestmark = pytest.mark.serve

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_nothing(template_app_url: str, tmp_path: Path) -> None:
    require_module("schemathesis")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
           f"{template_app_url}/openapi.json", "--url", template_app_url, "--checks", "all",
           "--max-examples", "20", "--generation-deterministic", "--request-timeout", "60",
           "--report", "ndjson", "--report-ndjson-path", str(report), "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-6000:]
    assert run.returncode == 0, tail
    generated = re.search(r"(\d+) generated", tail)
    assert generated and int(generated.group(1)) >= 100, tail  # it really ran: hundreds of cases
    assert "No issues found" in tail or "0 failures" in tail or "failure" not in tail.lower(), tail
    events = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    assert events, "schemathesis wrote no events"


def test_streaming_routes_are_declared_as_event_streams(template_app_url: str) -> None:
    spec = httpx.get(f"{template_app_url}/openapi.json", timeout=30).json()
    for path in ("/v1/chat", "/v1/chat/completions"):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert "text/event-stream" in content and "application/json" in content, (path, content)
    for path in ("/v1/sessions/{session_id}",):
        params = spec["paths"][path]["get"]["parameters"]
        assert params[0]["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"


def test_chunked_body_over_the_limit_is_413_not_read_whole(template_app_url: str) -> None:
    def body():
        yield b'{"message": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(f"{template_app_url}/v1/chat", content=body(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["error"]
