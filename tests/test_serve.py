"""The HTTP app under a real uvicorn server on 127.0.0.1: a tiny random export, real uploads, every refusal."""

from __future__ import annotations

import http.client
import io
import json
import struct
import sys
import uuid
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import launch_module, make_tiny_export
from PIL import Image, ImageFile
from starlette.exceptions import HTTPException

from expblip.data.facs import AUS
from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.infer.parse import parse_caption
from expblip.model.blip2 import GenerationConfig
from expblip.serve.app import background_server, create_app, decode_upload

GEN = GenerationConfig(num_beams=2, max_new_tokens=6, min_new_tokens=1)  # short: a random model never stops early
LIMIT = 256 * 1024  # max_upload_bytes of the test app


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height RGB pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post_file(url: str, data: bytes, filename: str = "face.png", content_type: str = "image/png",
              field: str = "image", chunked: bool = False) -> tuple[int, dict]:
    """POST one file as multipart/form-data with the standard library; (status, JSON body)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path + (f"?{parts.query}" if parts.query else ""))
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        # no Content-Length when chunked: the server can only count while it reads
        conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))))
        conn.endheaders()
        try:
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before reading it all: its answer is waiting to be read
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture(scope="module")
def captioner(export) -> Captioner:
    return Captioner.from_export(export)


@pytest.fixture(scope="module")
def server(captioner):
    with background_server(create_app(captioner, max_upload_bytes=LIMIT, gen=GEN)) as url:
        yield url


@pytest.fixture(scope="module")
def face_png() -> bytes:
    return png_bytes(next(iter(synthetic_records(1, seed=5)))["image"])


# ---------------------------------------------------------------- answers


def test_describe_a_png(server, captioner, face_png):
    status, body = post_file(f"{server}/describe", face_png)
    assert status == 200, body
    assert set(body) == {"caption", "aus", "emotions", "face", "crop", "image"}
    assert isinstance(body["caption"], str) and body["caption"]
    parsed = parse_caption(body["caption"])
    assert [a["au"] for a in body["aus"]] == parsed["aus"] and body["emotions"] == parsed["emotions"]
    assert all(a["name"] == AUS[a["au"]].name for a in body["aus"])
    assert body["face"] is None and body["crop"] == "none" and body["image"] == {"width": 64, "height": 64}
    image = Image.open(io.BytesIO(face_png)).convert("RGB")
    assert body["caption"] == captioner.describe([image], GEN)[0]["caption"]  # the same model, the same caption


def test_crop_face_reports_the_astronaut_face(captioner):
    from skimage import data

    with background_server(create_app(captioner, crop_face=True, gen=GEN)) as url:
        status, body = post_file(f"{url}/describe", png_bytes(Image.fromarray(data.astronaut())))
        assert status == 200, body
        assert body["crop"] == "face" and 150 < body["face"]["x"] < 200 and 40 < body["face"]["y"] < 90
        status, body = post_file(f"{url}/describe", png_bytes(Image.new("RGB", (90, 60), "grey")))
        assert status == 200 and body["crop"] == "centre" and body["face"] is None


def test_health_vocabulary_page_and_headers(server):
    status, headers, raw = get(f"{server}/health")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ok" and health["max_upload_bytes"] == LIMIT
    assert health["image_size"] == 64 and health["crop_face"] is False
    status, _, raw = get(f"{server}/vocabulary")
    vocabulary = json.loads(raw)
    assert {"au": 12, "name": "lip corner puller"} in vocabulary["aus"] and "happiness" in vocabulary["emotions"]
    status, headers, raw = get(f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="file"' in raw and b"/static/app.js" in raw and b"http" not in raw.split(b"<body")[1]  # no CDN
    assert "default-src 'self'" in headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        status, _, raw = get(f"{server}/static/{asset}")
        assert status == 200 and raw
    assert get(f"{server}/docs")[0] == 404  # Swagger UI would load from a CDN


# ---------------------------------------------------------------- refusals


def test_text_file_is_415_whatever_it_claims(server):
    status, body = post_file(f"{server}/describe", b"just some notes\n", "notes.txt", "text/plain")
    assert status == 415 and "notes.txt" in body["error"] and "PNG" in body["error"]
    status, body = post_file(f"{server}/describe", b"%!PS-Adobe-3.0 EPSF-3.0\n", "x.png", "image/png")
    assert status == 415  # an EPS (Ghostscript) dressed as a PNG is not decoded


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_upload_is_413(server, chunked):
    status, body = post_file(f"{server}/describe", b"\x89PNG" + bytes(2 * LIMIT), chunked=chunked)
    assert status == 413 and "0.25 MiB" in body["error"]


def test_upload_just_over_the_limit_is_413(server):
    status, body = post_file(f"{server}/describe", bytes(LIMIT + 1), "big.png")  # within the multipart allowance
    assert status == 413 and "big.png" in body["error"]


@pytest.mark.parametrize("side", [30_000, 12_000], ids=["above-PIL-limit", "above-app-limit"])
def test_decompression_bomb_header_is_refused_without_decoding(server, monkeypatch, side):
    bomb = png_header_claiming(side, side)  # 900 MP / 144 MP: 2.7 GB / 430 MB of RGB if it were decoded
    assert len(bomb) < 100

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused from the header, before any pixel
    with pytest.raises(HTTPException) as info:
        decode_upload(bomb, "bomb.png")
    assert info.value.status_code == 413 and "decompression-bomb" in info.value.detail
    status, body = post_file(f"{server}/describe", bomb, "bomb.png")
    assert status == 413 and "bomb.png" in body["error"] and "decompression-bomb" in body["error"]


def test_truncated_image_is_422(server, face_png):
    status, body = post_file(f"{server}/describe", face_png[: len(face_png) // 2], "cut.png")
    assert status == 422 and "cut.png" in body["error"]


def test_empty_and_missing_file_are_400(server):
    status, body = post_file(f"{server}/describe", b"", "empty.png")
    assert status == 400 and "empty" in body["error"]
    status, body = post_file(f"{server}/describe", b"x", field="photo")  # wrong field name
    assert status == 400 and "'image'" in body["error"]


# ---------------------------------------------------------------- the script and the wall


def test_serve_script_reports_a_missing_model(tmp_path, capsys):
    assert launch_module("serve").main(["--model", str(tmp_path / "nomodel")]) == 2
    assert "nomodel" in capsys.readouterr().err
    assert launch_module("serve").parse_args(["--model", "m"]).host == "127.0.0.1"  # loopback unless asked


def test_app_imports_neither_ray_nor_deepspeed():
    import subprocess

    code = ("import sys; import expblip.serve.app, expblip.serve.openai_api, expblip.serve.batching, "
            "expblip.serve.metrics, expblip.infer.face, expblip.infer.video; "
            "bad = [m for m in ('ray', 'deepspeed', 'expblip.train', 'mlflow') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
