"""decode_image: simplejpeg for JPEGs gives OpenCV's pixels; the rest stays OpenCV's.

A batch must be the same bytes on every replica (invariant 1), whichever decoder a
replica has: these tests pin that simplejpeg and OpenCV agree exactly on baseline,
progressive and grey JPEGs, and that what simplejpeg refuses still decodes.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from batchd_server.format import codec
from batchd_server.format.codec import DECODERS, decode_image

pytest.importorskip("simplejpeg", reason="simplejpeg is part of the server extra")


def _scene(seed: int, h: int = 96, w: int = 128) -> NDArray[np.uint8]:
    """Smooth gradients and edges, as photos have (noise alone is not a fair JPEG)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 2 + yy) % 256, (yy * 3) % 256, (xx ^ yy) % 256], axis=-1)
    img[rng.integers(0, h) :, rng.integers(0, w) :] //= 2
    return img.astype(np.uint8)


def _opencv(buf: bytes, channels: int) -> NDArray[np.uint8]:
    arr = np.frombuffer(buf, np.uint8)
    if channels == 1:
        return cv2.imdecode(arr, cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(cv2.imdecode(arr, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _jpeg(img: NDArray[np.uint8], *flags: int) -> bytes:
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90, *flags])
    assert ok
    return enc.tobytes()


CASES = {
    "baseline 4:2:0": lambda s: _jpeg(_scene(s)),
    "progressive": lambda s: _jpeg(_scene(s), cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    "4:4:4": lambda s: _jpeg(
        _scene(s), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
    ),
    "odd size": lambda s: _jpeg(_scene(s, 37, 53)),
    "grey file": lambda s: _jpeg(_scene(s)[:, :, 0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("channels", [3, 1])
def test_simplejpeg_gives_opencvs_pixels(case: str, channels: int) -> None:
    for seed in range(3):
        buf = CASES[case](seed)
        got = decode_image(buf, channels, mask=False)
        assert got is not None
        want = _opencv(buf, channels)
        assert got.shape == want.shape and got.dtype == np.uint8
        assert np.array_equal(got, want), f"{case}, channels={channels}, seed={seed}"


def test_jpegs_go_to_simplejpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = codec._simplejpeg.decode_jpeg

    def spy(data: object, **kw: object) -> object:
        calls.append(str(kw["colorspace"]))
        return real(data, **kw)

    monkeypatch.setattr(codec._simplejpeg, "decode_jpeg", spy)
    decode_image(_jpeg(_scene(0)), 3, mask=False)
    decode_image(_jpeg(_scene(0)), 1, mask=False)
    _, png = cv2.imencode(".png", _scene(0))
    decode_image(png.tobytes(), 3, mask=False)
    assert calls == ["RGB", "GRAY"]  # the PNG went to OpenCV
    assert DECODERS["jpeg"].startswith("simplejpeg ") and DECODERS["other"] == "opencv"


def test_cmyk_jpeg_falls_back_to_opencv() -> None:
    image = pytest.importorskip("PIL.Image", reason="Pillow writes the CMYK JPEG")
    out = io.BytesIO()
    image.fromarray(_scene(1)).convert("CMYK").save(out, format="JPEG", quality=90)
    buf = out.getvalue()
    got = decode_image(buf, 3, mask=False)
    assert got is not None and got.shape == (96, 128, 3)
    assert np.array_equal(got, _opencv(buf, 3))


def test_png_webp_and_masks_still_decode() -> None:
    img = _scene(2)
    for ext in (".png", ".webp"):
        ok, enc = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        assert ok
        got = decode_image(enc.tobytes(), 3, mask=False)
        assert got is not None and got.shape == img.shape
        if ext == ".png":
            assert np.array_equal(got, img)
    labels = (np.arange(96 * 128).reshape(96, 128) % 7).astype(np.uint8)
    ok, enc = cv2.imencode(".png", labels)
    mask = decode_image(enc.tobytes(), 1, mask=True)
    assert mask is not None and np.array_equal(mask, labels)


def test_damaged_jpegs_are_refused_or_decoded_as_opencv_does() -> None:
    buf = _jpeg(_scene(3))
    assert decode_image(b"\xff\xd8not a jpeg at all", 3, mask=False) is None
    assert decode_image(b"", 3, mask=False) is None
    cut = buf[: len(buf) // 2]  # truncated: simplejpeg refuses it, OpenCV reads what is there
    got = decode_image(cut, 3, mask=False)
    want = cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR)
    if want is None:
        assert got is None
    else:
        assert got is not None and np.array_equal(got, cv2.cvtColor(want, cv2.COLOR_BGR2RGB))
