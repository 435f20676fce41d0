"""``batchd pack | inspect | verify``: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from batchd_server.cli import cli, main
from batchd_server.errors import ConfigError, FormatError, PackError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for k in range(4):
        p = tmp_path / "src" / ("ants" if k % 2 else "bees") / f"{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
    return tmp_path / "src"


@pytest.fixture
def packed(folder: Path, tmp_path: Path) -> Path:
    result = CliRunner().invoke(cli, ["pack", str(folder), str(tmp_path / "ds"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "ds"


def test_pack_prints_the_summary(folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "pack",
            str(folder),
            str(tmp_path / "ds"),
            "--size",
            "8x6",
            "--resize-policy",
            "center-crop",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Packed 4 samples" in result.output and "uint8 (8, 6, 3)" in result.output
    assert "Fingerprint" in result.output and "Nothing skipped" in result.output


def test_inspect_text_and_json(packed: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(packed)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "samples      4" in out and "classes      2: ants, bees" in out
    assert "image" in out and "(10, 14, 3)" in out and "role=image" in out and "mode=raw" in out
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(packed), "--json"]).output)
    assert info["count"] == 4 and info["classes"] == ["ants", "bees"]
    assert [f["name"] for f in info["fields"]] == ["image", "label"]
    assert info["bytes"] > 4 * 10 * 14 * 3 and len(info["fingerprint"]) == 32
    assert info["packing"]["kind"] == "folder" and info["skipped"] == []


def test_verify_ok_and_corrupt(packed: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(packed)])
    assert result.exit_code == 0 and result.output.startswith("ok: ds: 4 samples")
    with open(packed / "image.raw", "r+b") as f:
        f.write(b"\xff\xfe")
    result = CliRunner().invoke(cli, ["verify", str(packed)])
    assert result.exit_code == 1 and isinstance(result.exception, FormatError)
    assert result.exception.path == packed / "image.raw" and "chunk 0/1" in str(result.exception)


def test_main_reports_errors_on_stderr_with_exit_1(
    packed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (packed / "label.raw").write_bytes(b"")
    for cmd in ("verify", "inspect"):
        with pytest.raises(SystemExit) as info:
            main([cmd, str(packed)])
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "label.raw: is 0 bytes" in err


@pytest.mark.parametrize(
    ("args", "code", "exc"),
    [
        (["--size", "big"], 2, None),
        (["--mode", "zip"], 2, None),
        (["--mode", "encoded", "--size", "4x4"], 1, ConfigError),
        (["--mask-column", "m"], 1, ConfigError),
        (["--workers", "0"], 2, None),
    ],
)
def test_pack_bad_options(
    folder: Path, tmp_path: Path, args: list[str], code: int, exc: type | None
) -> None:
    result = CliRunner().invoke(cli, ["pack", str(folder), str(tmp_path / "ds"), *args])
    assert result.exit_code == code, result.output
    if exc is not None:
        assert isinstance(result.exception, exc)
    assert not (tmp_path / "ds").exists()


def test_pack_refuses_existing_output_and_bad_input(
    packed: Path, folder: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, ["pack", str(folder), str(packed), "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, PackError)
    assert "--overwrite" in str(result.exception)
    assert (
        CliRunner().invoke(cli, ["pack", str(folder), str(packed), "-q", "--overwrite"]).exit_code
        == 0
    )
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (folder / "ants" / "1.png").write_bytes(b"not a png")
    result = CliRunner().invoke(cli, ["pack", str(folder), str(tmp_path / "y"), "-q"])
    assert result.exit_code == 1 and "ants/1.png: not an image" in str(result.exception)
    skip = ["pack", str(folder), str(tmp_path / "y"), "-q", "--on-error", "skip"]
    result = CliRunner().invoke(cli, skip)  # one bad file of a few: past the default 1%
    assert result.exit_code == 1 and "more than --max-skipped 1%" in str(result.exception)
    assert not (tmp_path / "y").exists()
    result = CliRunner().invoke(cli, [*skip, "--max-skipped", "50%"])
    assert result.exit_code == 0 and "Skipped 1" in result.output
    result = CliRunner().invoke(cli, [*skip, "--max-skipped", "lots"])
    assert result.exit_code == 1 and "max_skipped 'lots': give a share" in str(result.exception)


def test_verify_and_inspect_of_a_non_dataset(tmp_path: Path) -> None:
    for cmd in ("verify", "inspect"):
        result = CliRunner().invoke(cli, [cmd, str(tmp_path)])
        assert result.exit_code == 1 and isinstance(result.exception, FormatError)
        assert "not a batchd dataset" in str(result.exception)
