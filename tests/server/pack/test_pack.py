"""The packer: folders, CSVs, arrays and sample iterables into datasets, and its refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from packimages import H, W, rgb, save

from batchd_server import (
    PackOptions,
    open_dataset,
    pack,
    pack_arrays,
    pack_csv,
    pack_folder,
    pack_samples,
)
from batchd_server.errors import ConfigError, FormatError, PackError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """2 classes x 3 PNGs; image k (in sorted order) is rgb(k)."""
    root = tmp_path / "src"
    for k in range(6):
        save(root / ("cat" if k < 3 else "dog") / f"{k}.png", rgb(k))
    return root


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_folder_raw_round_trip(folder: Path, tmp_path: Path) -> None:
    s = pack_folder(folder, tmp_path / "ds", options=PackOptions(progress=False))
    assert s.count == 6 and s.skipped == [] and "Packed 6 samples" in str(s)
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.classes == ["cat", "dog"] and ds.fingerprint == s.fingerprint
        img = ds.array("image")
        assert img.shape == (6, H, W, 3) and ds.fields["image"].role == "image"
        for k in range(6):
            np.testing.assert_array_equal(img[k], rgb(k))
        np.testing.assert_array_equal(ds.array("label"), [0, 0, 0, 1, 1, 1])
        assert ds.array("label").dtype == np.int64
        assert (
            ds.header["packing"]["mode"] == "raw"
            and ds.header["packing"]["size_from"] == "first image"
        )


def test_folder_encoded_keeps_the_original_bytes(folder: Path, tmp_path: Path) -> None:
    save(folder / "dog" / "9.png", rgb(9, 20, 7))  # encoded mode takes any size
    pack(folder, tmp_path / "ds", options=PackOptions(mode="encoded"))
    with open_dataset(tmp_path / "ds") as ds:
        f = ds.fields["image"]
        assert (f.encoding, f.shape, f.channels) == ("image", None, 3)
        assert bytes(ds.encoded("image", 6)) == (folder / "dog" / "9.png").read_bytes()
        np.testing.assert_array_equal(ds.image("image", 6), rgb(9, 20, 7))
        assert tuple(ds.sizes("image")[6]) == (20, 7)
        np.testing.assert_array_equal(ds.image("image", 0), rgb(0))


def test_parallel_packing_is_ordered_and_deterministic(folder: Path, tmp_path: Path) -> None:
    one = pack(folder, tmp_path / "a", options=PackOptions(workers=1))
    many = pack(folder, tmp_path / "b", options=PackOptions(workers=3, block=1))
    assert one.fingerprint == many.fingerprint


@pytest.mark.parametrize("policy", ["resize", "center-crop", "letterbox"])
def test_resize_policies(tmp_path: Path, policy: Any) -> None:
    img = rgb(1, 12, 16)
    mask = np.zeros((12, 16), np.uint8)
    mask[:, 8:] = 5  # left half 0, right half 5
    save(tmp_path / "i.png", img)
    save(tmp_path / "m.png", mask)
    (tmp_path / "t.csv").write_text("image,seg\ni.png,m.png\n")
    pack_csv(
        tmp_path / "t.csv",
        tmp_path / "ds",
        mask_column="seg",
        options=PackOptions(size=(12, 12), resize_policy=policy),
    )
    with open_dataset(tmp_path / "ds") as ds:
        out, m = ds.array("image")[0], ds.array("mask")[0]
        assert out.shape == (12, 12, 3) and m.shape == (12, 12)
        assert set(np.unique(m)) <= {0, 5}  # nearest-neighbour: no blended labels
        if policy == "center-crop":  # scale 1: the middle 12 columns, exactly
            np.testing.assert_array_equal(out, img[:, 2:14])
            np.testing.assert_array_equal(m, mask[:, 2:14])
        if policy == "letterbox":  # 12x16 -> 9x12, padded top and bottom with zeros
            assert not out[0].any() and not out[-1].any() and out[6].any()
            assert not m[0].any()


def test_raw_without_size_refuses_another_size(folder: Path, tmp_path: Path) -> None:
    save(folder / "dog" / "big.png", rgb(7, 30, 30))
    # A tree names its inputs by path ("row 6" is for CSVs), and a size mismatch is the
    # source's, not a bad file's: skipping is no answer, so it is not offered (issue 16).
    match = r"dog/big.png: is 30x30, the first image 12x16; the images differ in size: pass --size"
    with pytest.raises(PackError, match=match) as err:
        pack(folder, tmp_path / "ds")
    assert "row" not in str(err.value) and "--on-error" not in str(err.value)
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []
    with pytest.raises(PackError, match=match):
        pack(folder, tmp_path / "ds", options=PackOptions(on_error="skip", max_skipped="100%"))
    assert not (tmp_path / "ds").exists()
    s = pack(folder, tmp_path / "ds2", options=PackOptions(size=(8, 8)))
    assert s.count == 7


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        ("png-truncated", "not an image"),
        ("jpeg-truncated", "truncated JPEG"),
    ],
)
def test_bad_images_stop_or_are_skipped(
    folder: Path, tmp_path: Path, content: Any, reason: str
) -> None:
    if content == "png-truncated":
        content = (folder / "cat" / "0.png").read_bytes()[:-30]
    elif content == "jpeg-truncated":
        content = cv2.imencode(".jpg", rgb(3))[1].tobytes()[:-200]
    (folder / "cat" / "1.png").write_bytes(content)
    with pytest.raises(PackError, match=rf"cat/1.png: {reason}.*--on-error skip"):
        pack(folder, tmp_path / "ds")
    assert leftovers(tmp_path) == [] and not (tmp_path / "ds").exists()
    # 1 of 6 is past the default 1%: nothing written, and the message says how to go on.
    with pytest.raises(PackError, match=r"1 of 6 inputs failed, more than --max-skipped 1%"):
        pack(folder, tmp_path / "ds", options=PackOptions(on_error="skip"))
    assert leftovers(tmp_path) == [] and not (tmp_path / "ds").exists()
    s = pack(folder, tmp_path / "ds", options=PackOptions(on_error="skip", max_skipped=1))
    assert s.count == 5 and "Skipped 1" in str(s) and reason in str(s)
    with open_dataset(tmp_path / "ds") as ds:
        (skipped,) = ds.header["skipped"]
        assert (
            skipped["source"].endswith("cat/1.png")
            and skipped["row"] == 1
            and reason in skipped["reason"]
        )
        np.testing.assert_array_equal(ds.array("label"), [0, 0, 1, 1, 1])
        np.testing.assert_array_equal(ds.array("image")[1], rgb(2))


def test_all_inputs_bad_is_an_error(folder: Path, tmp_path: Path) -> None:
    for p in folder.rglob("*.png"):
        p.write_bytes(b"junk")
    with pytest.raises(PackError, match="none of the 6 images decodes"):
        pack(folder, tmp_path / "ds", options=PackOptions(on_error="skip"))
    with pytest.raises(PackError, match="more than --max-skipped 1%"):
        pack(folder, tmp_path / "ds", options=PackOptions(on_error="skip", size=(4, 4)))
    with pytest.raises(PackError, match="nothing to pack"):
        every = PackOptions(on_error="skip", size=(4, 4), max_skipped="100%")
        pack(folder, tmp_path / "ds", options=every)
    assert leftovers(tmp_path) == []


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    with pytest.raises(PackError, match="no class subfolders"):
        pack(tmp_path / "none", tmp_path / "ds")
    (tmp_path / "none" / "cat").mkdir()
    with pytest.raises(PackError, match="hold no files"):
        pack(tmp_path / "none", tmp_path / "ds")
    with pytest.raises(PackError, match=r"a directory\) or a \.csv"):
        pack(save(tmp_path / "x.png", rgb(0)), tmp_path / "ds")


def test_output_exists_or_inside_source(folder: Path, tmp_path: Path) -> None:
    pack(folder, tmp_path / "ds")
    with pytest.raises(PackError, match="--overwrite"):
        pack(folder, tmp_path / "ds")
    pack(folder, tmp_path / "ds", options=PackOptions(overwrite=True, size=(4, 4)))
    with open_dataset(tmp_path / "ds") as ds:
        assert ds.fields["image"].shape == (4, 4, 3)
    with pytest.raises(PackError, match="inside it"):
        pack(folder, folder / "packed")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "zip"}, "mode"),
        ({"mode": "encoded", "size": (4, 4)}, "raw only"),
        ({"size": (0, 4)}, "size"),
        ({"resize_policy": "stretch"}, "resize_policy"),
        ({"on_error": "ignore"}, "on_error"),
        ({"workers": 0}, "workers"),
    ],
)
def test_options_validate(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PackOptions(**kw)


# ---------------------------------------------------------------- CSV


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    d = tmp_path / "csv"
    for k in range(3):
        save(d / "img" / f"{k}.png", rgb(k))
        save(d / "masks" / f"{k}.png", np.full((H, W), k + 1, np.uint8))
    return d


def test_csv_round_trip_with_mask_and_targets(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "t.csv").write_text(
        "filename,seg,count,score\n"
        "img/0.png,masks/0.png,3,0.5\n"
        "img/1.png,masks/1.png,0,1\n"
        " img/2.png ,masks/2.png,7,-2.25\n"
    )
    for mode in ("raw", "encoded"):
        out = tmp_path / mode
        pack(csv_dir / "t.csv", out, mask_column="seg", options=PackOptions(mode=mode))  # type: ignore[arg-type]
        with open_dataset(out) as ds:
            assert list(ds.fields) == ["image", "mask", "count", "score"] and ds.classes is None
            assert ds.fields["mask"].role == "mask" and ds.fields["mask"].channels == 1
            np.testing.assert_array_equal(ds.array("count"), [3, 0, 7])
            assert ds.array("count").dtype == np.int64 and ds.array("score").dtype == np.float32
            np.testing.assert_array_equal(ds.array("score"), [0.5, 1, -2.25])
            for k in range(3):
                image = ds.array("image")[k] if mode == "raw" else ds.image("image", k)
                mask = ds.array("mask")[k] if mode == "raw" else ds.image("mask", k)
                np.testing.assert_array_equal(image, rgb(k))
                np.testing.assert_array_equal(mask, np.full((H, W), k + 1))
            assert (
                ds.header["packing"]["kind"] == "csv"
                and ds.header["packing"]["mask_column"] == "seg"
            )


@pytest.mark.parametrize(
    ("text", "mask_column", "match"),
    [
        ("", None, "empty"),
        ("image,y\n", None, "no rows"),
        ("picture,y\nimg/0.png,1\n", None, "no image path column; name one of"),
        ("image,y\nimg/0.png,1\n", "seg", "no mask column 'seg'"),
        (
            "image,y\nimg/0.png,1\nimg/1.png,cat\n",
            None,
            "line 3: column 'y' holds 'cat', not a number",
        ),
        ("image,y\nimg/0.png,\n", None, "line 2: column 'y' holds '', not a number"),
        ("image,y\nimg/0.png,1,2\n", None, "line 2: 3 cells"),
        ("image,index\nimg/0.png,1\n", None, "'index' clashes"),
        ("image,mask\nimg/0.png,1\n", None, "'mask' clashes"),
        ("image,my col\nimg/0.png,1\n", None, "cannot be a field name"),
        ("image,y,y\nimg/0.png,1,1\n", None, "repeated column"),
        ("image,y\n,1\n", None, "line 2: empty 'image' cell"),
    ],
)
def test_csv_errors_before_any_work(
    csv_dir: Path, tmp_path: Path, text: str, mask_column: str | None, match: str
) -> None:
    (csv_dir / "t.csv").write_text(text)
    with pytest.raises(PackError, match=match):
        pack(csv_dir / "t.csv", tmp_path / "ds", mask_column=mask_column)
    assert not (tmp_path / "ds").exists() and leftovers(tmp_path) == []


def test_csv_mask_size_mismatch_names_both(csv_dir: Path, tmp_path: Path) -> None:
    save(csv_dir / "masks" / "1.png", np.zeros((5, 5), np.uint8))
    (csv_dir / "t.csv").write_text("path,m\nimg/0.png,masks/0.png\nimg/1.png,masks/1.png\n")
    with pytest.raises(PackError, match=r"1.png \(line 3\): mask .*1.png is 5x5, the image 12x16"):
        pack(csv_dir / "t.csv", tmp_path / "ds", mask_column="m")
    save(csv_dir / "masks" / "1.png", rgb(0))  # a colour mask is not a label map
    with pytest.raises(PackError, match="single-channel 8-bit"):
        pack(csv_dir / "t.csv", tmp_path / "ds", mask_column="m")


def test_mask_column_on_a_folder_is_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CSV"):
        pack(folder, tmp_path / "ds", mask_column="m")


# ---------------------------------------------------------------- progress


def test_progress_bar_on_stderr(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack(folder, tmp_path / "a", options=PackOptions(progress=True))
    err = capsys.readouterr().err
    assert "6/6" in err and "img/s" in err
    pack(folder, tmp_path / "b")  # auto: stderr is not a TTY under pytest
    pack(folder, tmp_path / "c", options=PackOptions(progress=False))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- arrays and samples


def test_pack_arrays_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(50, 4, 5, 3)
    )
    mm[:] = rng.integers(0, 256, mm.shape)
    arrays = {
        "image": mm,
        "mask": rng.integers(0, 3, (50, 4, 5), dtype=np.uint8),
        "label": rng.integers(0, 3, 50),
        "target": rng.random(50).astype(">f8"),  # big-endian in, little-endian on disk
        "vec": rng.random((50, 7)).astype(np.float16),
    }
    s = pack_arrays(tmp_path / "ds", arrays, classes=["a", "b", "c"])
    with open_dataset(s.path) as ds:
        assert ds.fields["image"].role == "image" and ds.fields["mask"].role == "mask"
        assert ds.fields["vec"].role == "value" and ds.array("target").dtype.str == "<f8"
        for name, arr in arrays.items():
            np.testing.assert_array_equal(ds.array(name), arr)


@pytest.mark.parametrize(
    ("arrays", "kw", "match"),
    [
        ({}, {}, "no arrays"),
        ({"a": np.zeros(3), "b": np.zeros(4)}, {}, "differ in length"),
        ({"a": np.zeros((0, 2))}, {}, "empty"),
        ({"a": np.array(["x", "y"])}, {}, "numbers only"),
        ({"index": np.zeros(3)}, {}, "reserved"),
        ({"a": np.zeros(())}, {}, "first"),
        ({"label": np.array([0, 3])}, {"classes": ["a", "b"]}, "label of sample 1 is 3"),
        (
            {"image": np.zeros((2, 4), np.float32)},
            {"roles": {"image": "image"}},
            "raw image is uint8",
        ),
    ],
)
def test_pack_arrays_refuses(
    tmp_path: Path, arrays: dict[str, Any], kw: dict[str, Any], match: str
) -> None:
    with pytest.raises(PackError, match=match):
        pack_arrays(tmp_path / "ds", arrays, **kw)
    assert list(tmp_path.iterdir()) == []


def png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img[..., ::-1] if img.ndim == 3 else img)[1].tobytes()


def test_pack_samples_round_trip(tmp_path: Path) -> None:
    def samples() -> Iterator[dict[str, Any]]:
        for k in range(7):
            yield {
                "photo": png(rgb(k, 3 + k, 4)),
                "seg": png(np.full((3 + k, 4), k, np.uint8)),
                "y": k * 0.5,
                "n": k,
                "v": np.arange(3) + k,
            }

    s = pack_samples(tmp_path / "ds", samples(), roles={"seg": "mask"}, total=7)
    with open_dataset(s.path) as ds:
        assert ds.fields["photo"].encoding == "image" and ds.fields["seg"].channels == 1
        assert ds.array("y").dtype == np.float32 and ds.array("n").dtype == np.int64
        np.testing.assert_array_equal(ds.image("photo", 5), rgb(5, 8, 4))
        np.testing.assert_array_equal(ds.image("seg", 5), np.full((8, 4), 5))
        np.testing.assert_array_equal(ds.array("v")[6], [6, 7, 8])
        np.testing.assert_array_equal(ds.array("y"), np.arange(7) * 0.5)


def test_pack_samples_errors_and_skips(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="no samples"):
        pack_samples(tmp_path / "ds", [])
    with pytest.raises(PackError, match=r"sample 1 field 'v': shape \(3,\)"):
        pack_samples(tmp_path / "ds", [{"v": np.zeros(2)}, {"v": np.zeros(3)}])
    with pytest.raises(PackError, match="sample 1 has fields"):
        pack_samples(tmp_path / "ds", [{"v": 1}, {"w": 1}])
    with pytest.raises(PackError, match="does not cast"):
        pack_samples(tmp_path / "ds", [{"v": 1}, {"v": 1.5}])
    with pytest.raises(PackError, match="sample 1: field 'img'"):
        pack_samples(tmp_path / "ds", [{"img": png(rgb(0))}, {"img": b"junk"}])
    assert list(tmp_path.iterdir()) == []
    s = pack_samples(
        tmp_path / "ds",
        [{"img": png(rgb(0))}, {"img": b"junk"}, {"img": png(rgb(2))}],
        on_error="skip",
        max_skipped=1,
    )
    assert s.count == 2 and s.skipped[0]["source"] == "sample 1"
    junk = [{"img": png(rgb(0))}, {"img": b"junk"}, {"img": png(rgb(2))}]
    with pytest.raises(PackError, match=r"1 of 3 inputs failed, more than --max-skipped 10%"):
        pack_samples(tmp_path / "ds2", junk, on_error="skip", max_skipped="10%")
    with pytest.raises(PackError, match=r"1 of 2 inputs failed"):  # told the total: stops early
        pack_samples(tmp_path / "ds2", iter(junk), on_error="skip", total=2, max_skipped="10%")
    taken: list[int] = []

    def counted() -> Iterator[dict[str, Any]]:
        for k, sample in enumerate(junk):
            taken.append(k)
            yield sample

    with pytest.raises(ConfigError, match="max_skipped '-1'"):
        pack_samples(tmp_path / "ds2", counted(), on_error="skip", max_skipped="-1")
    assert taken == []  # refused before the first sample is read
    assert not (tmp_path / "ds2").exists()


def test_iterator_failing_halfway_leaves_no_dataset(tmp_path: Path) -> None:
    def samples() -> Iterator[dict[str, Any]]:
        for k in range(100):
            if k == 50:
                raise OSError("the source went away")
            yield {"v": np.full(1000, k, np.float32)}

    with pytest.raises(OSError, match="went away"):
        pack_samples(tmp_path / "ds", samples())
    assert list(tmp_path.iterdir()) == []


KILLED = """
import sys, time
import numpy as np
from batchd_server import pack_samples

def samples():
    for k in range(10_000):
        if k == 20:
            print("halfway", flush=True)
        if k >= 20:
            time.sleep(0.01)
        yield {"v": np.full(1000, k, np.float32)}

pack_samples(sys.argv[1], samples())
"""


def test_sigkill_mid_pack_leaves_nothing_open_dataset_accepts(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "halfway"
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert not out.exists()
    debris = [p for p in tmp_path.iterdir()]
    assert debris and all(p.name.startswith(".ds.tmp-") for p in debris)
    for p in debris:
        with pytest.raises(FormatError):
            open_dataset(p)


def test_missing_parent_folders_are_made_as_mkdir_p(tmp_path: Path) -> None:
    out = tmp_path / "data" / "nested" / "ds"  # neither data/ nor nested/ exists yet
    pack_arrays(out, {"label": np.arange(5)})
    with open_dataset(out) as ds:
        assert ds.count == 5
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PackError, match="exists and is not a folder"):
        pack_arrays(tmp_path / "file" / "ds", {"label": np.arange(5)})
    with pytest.raises(PackError, match="exists and is not a folder"):
        pack_samples(tmp_path / "file" / "ds", [{"label": 1}])
