"""compose.yaml for real, with docker-compose: config, up, run --rm pack, down.

The project is a temporary folder holding a copy of compose.yaml (less the loopback port it
publishes: docker refuses published ports with host networking) and a test-only override
(compose.test.yaml) that puts both services on the host network, serving on a free
loopback port: no bridge network is made and nothing is published through one (the
tests check the engine's network list is unchanged). The override also names the image
the session built, so compose builds nothing. The tests run in file order: ``up`` first,
``down`` last.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from dockerengine import Docker, wait_healthy

from batchd import Client
from serverproc import free_port

pytestmark = pytest.mark.timeout(1800)  # the first test pays for the base and the build

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "compose-test-token"
UID = 10001  # compose's default BATCHD_UID, which must own ./data for `run pack` to write


@dataclass
class Project:
    docker: Docker
    dir: Path
    name: str
    url: str
    env: dict[str, str]
    networks: str  # the engine's networks before `up`

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", self.name, "-f", "compose.yaml", "-f", "compose.test.yaml",
             *args],
            cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip

    def ok(self, *args: str, timeout: float = 300) -> str:
        done = self.compose(*args, timeout=timeout)
        assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    def logs(self) -> str:
        done = self.compose("logs", "--no-color", timeout=60)
        return done.stdout + done.stderr

    def containers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return self.docker("ps", "-a", "-q", "--filter", label).split()

    def datasets(self) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}/v1/datasets", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {d["name"]: d for d in json.loads(resp.read())["datasets"]}


def _override(image: str, port: int) -> dict[str, Any]:
    command = ["batchd", "serve", "--data", "/data", "--host", "127.0.0.1"]
    command += ["--demo-if-empty", "/tmp/batchd-demo"]  # compose.yaml's, but on loopback
    return {
        "services": {
            "batchd": {
                "image": image,
                "network_mode": "host",
                "command": command,
                "environment": {"BATCHD_PORT": str(port)},  # the HEALTHCHECK reads it too
            },
            "pack": {"image": image, "network_mode": "host"},
        }
    }


@pytest.fixture(scope="module")
def project(
    docker: Docker, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Project]:
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose on PATH (apt-get install docker-compose; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip(f"./data must belong to uid {UID} (compose's default) for `run pack`: root")
    folder = tmp_path_factory.mktemp("compose")
    # compose.yaml as it is, but for the loopback port it publishes: host networking
    # publishes nothing (docker refuses both), and v1 overrides cannot drop a key (no !reset)
    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())
    del spec["services"]["batchd"]["ports"]
    (folder / "compose.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "docker").mkdir()
    shutil.copy2(ROOT / "docker" / "Dockerfile", folder / "docker" / "Dockerfile")
    port = free_port()
    (folder / "compose.test.yaml").write_text(yaml.safe_dump(_override(image, port)))
    (folder / "data").mkdir()
    os.chown(folder / "data", UID, UID)
    _source_images(folder / "source" / "pets")
    env = {**docker.env, "BATCHD_TOKEN": TOKEN}
    env.pop("BATCHD_UID", None), env.pop("BATCHD_GID", None), env.pop("BATCHD_SOURCE", None)
    proj = Project(
        docker, folder, f"batchdtest{uuid.uuid4().hex[:8]}", f"http://127.0.0.1:{port}", env,
        networks=docker("network", "ls", "-q"),
    )  # fmt: skip
    try:
        yield proj
    finally:
        proj.compose("down", "--remove-orphans", "--timeout", "30", timeout=120)
        for cid in proj.containers():  # whatever down did not take
            docker("rm", "-f", cid, check=False)


def _source_images(root: Path) -> None:
    """40 PNGs of 24x24 in two class folders (cat: dark, dog: bright)."""
    rng = np.random.default_rng(3)
    for name, low in (("cat", 0), ("dog", 128)):
        (root / name).mkdir(parents=True)
        for i in range(20):
            img = rng.integers(low, low + 128, (24, 24, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / name / f"{i:03d}.png"), img)


def test_config_validates(project: Project, image: str) -> None:
    shutil.copy2(ROOT / "compose.yaml", project.dir / "compose.orig.yaml")  # the real file
    done = subprocess.run(
        ["docker-compose", "-f", "compose.orig.yaml", "config", "-q"],
        cwd=project.dir, env=project.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(project.ok("config"))
    for name in ("batchd", "pack"):
        svc = merged["services"][name]
        assert svc["network_mode"] == "host" and svc["image"] == image
    assert merged["services"]["batchd"]["read_only"] is True


def test_up_serves_the_demo_from_an_empty_data(project: Project) -> None:
    project.ok("up", "-d", "batchd")
    wait_healthy(project.url, 180, project.logs)  # the demo pack is made before it listens
    shapes = project.datasets()["shapes"]
    with Client(project.url, "shapes", batch_size=250, seed=2, token=TOKEN) as client:
        ids = np.concatenate([b["index"] for b in client.iterate(0)])
    assert sorted(ids.tolist()) == list(range(shapes["count"]))
    assert project.docker("network", "ls", "-q") == project.networks, "a network was made"


def test_run_pack_packs_a_folder_into_data_and_the_server_picks_it_up(project: Project) -> None:
    project.ok("run", "--rm", "pack", "pets", "pets", "--size", "24x24", timeout=600)
    assert (project.dir / "data" / "pets" / "batchd.header").is_file()
    assert os.stat(project.dir / "data" / "pets").st_uid == UID
    deadline = time.monotonic() + 60
    while "pets" not in project.datasets():
        assert time.monotonic() < deadline, f"the server never saw ./data/pets:\n{project.logs()}"
        time.sleep(0.5)
    with Client(project.url, "pets", batch_size=8, seed=4, token=TOKEN) as client:
        batches = list(client.iterate(0))
    ids = np.concatenate([b["index"] for b in batches])
    assert sorted(ids.tolist()) == list(range(40))
    for b in batches:  # cats are dark, dogs bright: the labels follow the folders
        bright = b["image"].reshape(len(b["index"]), -1).mean(axis=1) > 128
        assert (bright == (b["label"] == 1)).all()


def test_down_leaves_nothing_running(project: Project) -> None:
    assert project.containers(), "nothing was up: this checks nothing"
    project.ok("down", "--timeout", "30", timeout=120)
    assert project.containers() == []
    assert project.docker("network", "ls", "-q") == project.networks
    with socket.socket() as s:
        host, port = project.url.removeprefix("http://").split(":")
        assert s.connect_ex((host, int(port))) != 0, "something still listens on the port"
