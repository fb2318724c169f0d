"""Checks compose.yaml without a Docker engine: valid YAML, every service has an image, every
depends_on names a service with a condition Compose knows, every service is on a declared
network, every mounted file exists in the repository, and a service run in several replicas
publishes no fixed host port and has no fixed container name (replicas would collide)."""

import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
compose = yaml.safe_load((root / "compose.yaml").read_text())
services = compose["services"]
networks = set(compose.get("networks", {}))
problems = []
for name, service in services.items():
    if "image" not in service:
        problems.append(f"{name}: no image")
    for dependency, spec in (service.get("depends_on") or {}).items():
        if dependency not in services:
            problems.append(f"{name}: depends on unknown service {dependency}")
        condition = spec.get("condition")
        if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
            problems.append(f"{name}: unknown condition {condition}")
        if condition == "service_healthy" and "healthcheck" not in services.get(dependency, {}):
            problems.append(f"{name}: waits for {dependency} to be healthy, which has no healthcheck")
    for network in service.get("networks", []):
        if network not in networks:
            problems.append(f"{name}: unknown network {network}")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./") and not (root / source).exists():
            problems.append(f"{name}: mounts missing {source}")
    replicas = (service.get("deploy") or {}).get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 1:
        problems.append(f"{name}: replicas {replicas!r} is not a positive number")
    elif replicas > 1 and (service.get("ports") or "container_name" in service):
        problems.append(f"{name}: {replicas} replicas cannot share fixed ports or a container name")
if problems:
    sys.exit("\n".join(problems))
print(f"compose.yaml: {len(services)} services ok")
