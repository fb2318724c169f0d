"""Checks compose.yaml without a Docker engine: valid YAML, every service has an image, every
depends_on names a service with a condition Compose knows, every service is on a declared
network, and every mounted file exists in the repository."""

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
if problems:
    sys.exit("\n".join(problems))
print(f"compose.yaml: {len(services)} services ok")
