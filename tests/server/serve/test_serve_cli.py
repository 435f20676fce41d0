"""``batchd serve``: option handling, the exposure guard, env vars, uvicorn settings,
--demo-if-empty, and graceful SIGTERM of a real process."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner

from batchd_server.cli import cli
from batchd_server.errors import ConfigError
from batchd_server.serve.cli import check_exposure, parse_bytes
from serverproc import ServerProcess, tiny_pack


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    tiny_pack(root / "tiny", n=16)
    return root


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Replace uvicorn's serving loop: record the config instead of listening."""
    seen: dict[str, Any] = {}
    engines: list[Any] = []

    def fake_run(self: uvicorn.Server, sockets: Any = None) -> None:
        app: Any = self.config.app
        seen["config"] = self.config
        seen["app"] = app
        engines.append(app.state.engine)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    yield seen
    for engine in engines:
        engine.close()


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, ["serve", *args], env=env, catch_exceptions=True)


def test_parse_bytes() -> None:
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_exposure_guard() -> None:
    with pytest.raises(ConfigError, match=r"binding 0\.0\.0\.0 without --token exposes"):
        check_exposure("0.0.0.0", None, None, False)
    check_exposure("0.0.0.0", None, "tok", False)
    check_exposure("0.0.0.0", None, None, True)
    check_exposure("127.0.0.1", None, None, False)
    check_exposure("0.0.0.0", Path("/tmp/x.sock"), None, False)  # a socket file is local


def test_public_host_without_token_refuses_to_start(data: Path, tmp_path: Path) -> None:
    """A real process: exit 1 and the fix on stderr, before anything listens."""
    proc = subprocess.run(
        [
            *(sys.executable, "-c", "from batchd_server.cli import main; main()", "serve"),
            *("--data", str(data), "--host", "0.0.0.0", "--port", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "--token" in proc.stderr and "--allow-unauthenticated" in proc.stderr


def test_env_vars_are_options(data: Path, captured: dict[str, Any]) -> None:
    result = invoke([], env={"BATCHD_DATA": str(data), "BATCHD_HOST": "0.0.0.0"})
    assert isinstance(result.exception, ConfigError)  # BATCHD_HOST was read
    result = invoke(
        [],
        env={
            "BATCHD_DATA": str(data),
            "BATCHD_HOST": "0.0.0.0",
            "BATCHD_TOKEN": "t",
            "BATCHD_PORT": "9999",
            "BATCHD_THREADS": "3",
            "BATCHD_CACHE_BYTES": "64MiB",
        },
    )
    assert result.exit_code == 0, result.output
    cfg = captured["config"]
    assert (cfg.host, cfg.port) == ("0.0.0.0", 9999)


def test_uvicorn_settings(data: Path, captured: dict[str, Any], tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    result = invoke(["--data", str(data), "--uds", str(sock), "--log-level", "warning"])
    assert result.exit_code == 0, result.output
    cfg = captured["config"]
    assert cfg.uds == str(sock)
    assert (cfg.loop, cfg.http) == ("uvloop", "httptools")
    assert cfg.timeout_graceful_shutdown == 10


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threads", "0"], "--threads"),
        (["--cache-bytes", "lots"], "not a size"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_options_are_usage_errors(data: Path, args: list[str], needle: str) -> None:
    result = invoke(["--data", str(data), *args])
    assert result.exit_code == 2 and needle in result.output


def test_missing_data_folder(tmp_path: Path, captured: dict[str, Any]) -> None:
    result = invoke(["--data", str(tmp_path / "nope")])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception).startswith(f"--data {tmp_path / 'nope'} does not exist")
    # --demo-if-empty does not stand in for a mistyped --data
    result = invoke(["--data", str(tmp_path / "nope"), "--demo-if-empty", str(tmp_path / "d")])
    assert "does not exist" in str(result.exception) and not (tmp_path / "d").exists()


def test_a_file_as_data_is_a_usage_error(tmp_path: Path, captured: dict[str, Any]) -> None:
    (tmp_path / "f").write_text("x")
    result = invoke(["--data", str(tmp_path / "f")])
    assert result.exit_code == 2 and "is a file" in result.output, result.output


def test_a_pack_as_data_says_to_pass_its_parent(data: Path, captured: dict[str, Any]) -> None:
    """A real process: ``--data ./data/tiny`` fails at start and names ./data."""
    proc = subprocess.run(
        [
            *(sys.executable, "-c", "from batchd_server.cli import main; main()", "serve"),
            *("--data", str(data / "tiny"), "--demo-if-empty", str(data.parent / "demo")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --data {data / 'tiny'} is a batchd pack")
    assert f"pass its parent folder, --data {data}, to serve it as 'tiny'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (data.parent / "demo").exists()


def test_folders_that_are_not_packs_are_warned_about_at_start(
    data: Path, captured: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(12):
        (data / f"junk{i:02}").mkdir()
    photos = data / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    caplog.set_level("WARNING", logger="batchd")
    result = invoke(["--data", str(data)])
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.name == "batchd.serve"]
    assert len(warned) == 11, warned  # ten folders, then how many more
    assert warned[0] == f"not serving {data / 'junk00'}: an empty folder, not a batchd pack"
    assert warned[-1] == "and 3 more folders under --data that are not packs"
    engine = captured["app"].state.engine
    assert [d.name for d in engine.registry.datasets()] == ["tiny"]


def test_demo_if_empty(
    tmp_path: Path, captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchd_server.demo as demo

    calls: list[Path] = []

    def fake_demo(root: Path, **_: Any) -> Path:
        calls.append(Path(root))
        Path(root).mkdir(parents=True, exist_ok=True)
        return Path(tiny_pack(Path(root) / "shapes", n=8))

    monkeypatch.setattr(demo, "ensure_demo_pack", fake_demo)
    empty, demo_dir = tmp_path / "empty", tmp_path / "demo"
    empty.mkdir()
    (empty / "photos").mkdir()  # a folder that is not a pack: still no pack, so the demo
    result = invoke(["--data", str(empty), "--demo-if-empty", str(demo_dir)])
    assert result.exit_code == 0, result.output
    assert calls == [demo_dir]
    engine = captured["app"].state.engine
    assert [d.name for d in engine.registry.datasets()] == ["shapes"]

    calls.clear()  # a folder that holds a pack: no demo
    result = invoke(["--data", str(demo_dir), "--demo-if-empty", str(tmp_path / "other")])
    assert result.exit_code == 0 and calls == []


def test_sigterm_exits_cleanly(data: Path) -> None:
    srv = ServerProcess(data)
    with srv, srv.client() as c:
        assert c.get("/v1/datasets/tiny/batches/0", params={"batch_size": 4}).status_code == 200
        # uvicorn drains, then re-raises the captured SIGTERM (exit by signal, as Docker
        # expects); -SIGKILL would mean it hung past the grace period.
        assert srv.stop() in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.log()


def test_sigusr1_prints_thread_stacks_and_keeps_serving(data: Path) -> None:
    srv = ServerProcess(data)
    with srv, srv.client() as c:
        stacks = srv.stacks()
        # faulthandler's dump: one block per thread, the main one running uvicorn's loop.
        assert "Current thread" in stacks or "Thread 0x" in stacks, stacks
        assert "uvicorn" in stacks, stacks
        assert c.get("/v1/datasets/tiny/batches/0", params={"batch_size": 4}).status_code == 200
