"""Static checks of docker-compose.yml and the Dockerfile (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = "/etc/popvault/popvault.toml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """target path -> source (named volume or host path)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def test_services_present(services: dict[str, Any]) -> None:
    assert set(services) >= {"redis", "elasticsearch", "kibana", "worker", "beat", "flower"}


def test_images_and_versions(services: dict[str, Any]) -> None:
    assert re.fullmatch(r"redis:7(\.\d+)*(-alpine)?", services["redis"]["image"])
    assert services["elasticsearch"]["image"].endswith("/elasticsearch:9.2.0")
    assert services["kibana"]["image"].endswith("/kibana:9.2.0")
    for name in ("worker", "beat"):
        build = services[name]["build"]
        assert build["dockerfile"] == "Dockerfile" and build["context"] == "."


def test_every_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_worker_and_beat_commands(services: dict[str, Any]) -> None:
    worker = _command(services["worker"])
    assert worker[:4] == ["celery", "-A", "workers", "worker"]
    queues = worker[worker.index("--queues") + 1].split(",")
    assert set(queues) == {"popvault.poll", "popvault.sweep"}
    assert "-B" not in worker and "--beat" not in worker  # beat runs once, in its own service
    beat = _command(services["beat"])
    assert beat[:4] == ["celery", "-A", "workers", "beat"]
    assert "flower" in _command(services["flower"])


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a published port breaks --scale worker=N"


def test_config_mounted_and_archive_on_a_volume(compose: dict[str, Any],
                                                services: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name in ("worker", "beat"):
        svc = services[name]
        targets = _volume_targets(svc)
        assert CONFIG_PATH in targets, f"{name}: config not mounted"
        assert svc["environment"]["POPVAULT_CONFIG"] == CONFIG_PATH
        assert targets.get("/var/lib/popvault") in named, f"{name}: archive not on a volume"
    es = _volume_targets(services["elasticsearch"])
    assert es.get("/usr/share/elasticsearch/data") in named


def test_startup_order_waits_for_health(services: dict[str, Any]) -> None:
    for name in ("worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["elasticsearch"]["condition"] == "service_healthy"
    assert services["kibana"]["depends_on"]["elasticsearch"]["condition"] == "service_healthy"


def test_elasticsearch_single_node(services: dict[str, Any]) -> None:
    env = services["elasticsearch"]["environment"]
    assert env["discovery.type"] == "single-node"


def test_published_ports_are_loopback_only(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all hosts"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.match(r"RUN pip install \.( |$)", ln) for ln in lines)
    assert any(ln.startswith("USER ") and "root" not in ln for ln in lines)
    for needed in ("pyproject.toml", "ingest", "workers", "schemas"):
        assert any(ln.startswith("COPY") and needed in ln for ln in lines), needed
