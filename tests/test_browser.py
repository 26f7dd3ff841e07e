"""The page in a real headless Chromium against a real server: choose a file, describe it, read the chips.

Skipped when no Chromium is installed (Debian: ``apt-get install -y chromium``; or set $EXPBLIP_CHROMIUM).
The screenshot goes to $EXPBLIP_ARTIFACTS (or the test's tmp_path) and its path is printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
from browser import Chromium, Page, find_chromium
from PIL import Image
from skimage import data
from test_serve import GEN

from expblip.data.captions import au_caption, concat_fusion, emotion_caption
from expblip.data.facs import AUS
from expblip.data.synthetic import synthetic_records
from expblip.infer.captioner import Captioner
from expblip.model.blip2 import Generated
from expblip.serve.app import background_server, create_app

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (apt-get install -y chromium, "
                                                         "or set EXPBLIP_CHROMIUM to a Chrome/Chromium binary)")
SCRIPTED = concat_fusion(au_caption([6, 12, 25]), emotion_caption(["happiness"]))  # parses to AU6, 12, 25; happiness


class ScriptedCaptioner(Captioner):
    """A captioner that always writes SCRIPTED: the page's highlighting is checked on a caption that names AUs
    (a random tiny model writes none)."""

    def caption_pixels(self, pixel_values, gen=None, prompt="", with_lengths=False) -> list:
        return [Generated(SCRIPTED, 20, True) if with_lengths else SCRIPTED for _ in pixel_values]


@pytest.fixture(scope="module")
def captioner(tiny_run_dir) -> Captioner:
    return Captioner.from_export(tiny_run_dir / "export")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("chromium")
    with Chromium(CHROMIUM, root / "profile", log=root / "chromium.log") as browser:
        yield browser.new_page()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("EXPBLIP_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _describe_in_page(page: Page, url: str, image: Path) -> str:
    """Open the page, choose ``image`` in the file input, press Describe; the final body[data-state]."""
    page.goto(f"{url}/")
    page.wait_for("document.querySelectorAll('#aus .chip').length > 0")  # the vocabulary arrived
    page.set_files("#file", [image])
    page.wait_for("document.body.dataset.state === 'ready' && !document.querySelector('#describe').disabled")
    page.evaluate("document.querySelector('#describe').click()")
    return page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                         timeout=60)


def _chips(page: Page, selector: str) -> list[str]:
    return page.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")


def test_page_describes_an_upload_with_the_tiny_export(page, captioner, tmp_path):
    face = next(iter(synthetic_records(1, seed=5)))["image"]
    face.save(tmp_path / "face.png")
    with background_server(create_app(captioner, gen=GEN)) as url:
        assert _describe_in_page(page, url, tmp_path / "face.png") == "done", page.evaluate("error.textContent")
    expected = captioner.describe([face], GEN)[0]
    assert page.evaluate("document.querySelector('#caption').textContent") == expected["caption"]
    assert len(_chips(page, "#aus .chip.au")) == len(AUS)  # the whole vocabulary, the caption's AUs lit
    assert _chips(page, "#aus .chip.on") == [f"AU{au} {AUS[au].name}" for au in expected["aus"]]
    assert page.evaluate("document.querySelector('#preview').naturalWidth") == 64  # the preview shows the upload
    assert page.problems() == []  # no exception, console error or CSP violation


def test_page_highlights_aus_emotion_and_face(page, captioner, tmp_path, artifacts):
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    scripted = ScriptedCaptioner(**{f.name: getattr(captioner, f.name) for f in fields(Captioner)})
    with background_server(create_app(scripted, crop_face=True)) as url:
        assert _describe_in_page(page, url, tmp_path / "astronaut.png") == "done"
    assert page.evaluate("document.querySelector('#caption').textContent") == SCRIPTED
    assert _chips(page, "#aus .chip.on") == ["AU6 cheek raiser", "AU12 lip corner puller", "AU25 lips part"]
    assert _chips(page, "#emotions .chip") == ["happiness"]
    box = page.evaluate("(() => { const b = document.querySelector('#facebox');"
                        " return b.hidden ? null : parseFloat(b.style.left); })()")
    assert box is not None and 30 < box < 40  # the face starts about a third of the way across the photo
    assert "largest face" in page.evaluate("document.querySelector('#crop-note').textContent")
    assert page.problems() == []
    shot = page.screenshot(artifacts / "expblip-page.png")
    print(f"screenshot: {shot}")
    assert Image.open(shot).size[0] >= 1000


def test_page_shows_the_servers_error(page, captioner, tmp_path):
    (tmp_path / "notes.png").write_text("not an image, whatever the name says")
    with background_server(create_app(captioner, gen=GEN)) as url:
        assert _describe_in_page(page, url, tmp_path / "notes.png") == "error"
    message = page.evaluate("(() => { const e = document.querySelector('#error'); return e.hidden ? '' :"
                            " e.textContent; })()")
    assert "notes.png" in message and "PNG" in message


def test_page_takes_drops_and_refuses_oversized_files_itself(page, captioner):
    drop = """((name, size) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(size)], name, {type: 'image/png'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true,
                                                                             cancelable: true}));
        return document.body.dataset.state;
    })"""
    with background_server(create_app(captioner, max_upload_bytes=1024 * 1024, gen=GEN)) as url:
        page.goto(f"{url}/")
        page.wait_for("document.querySelectorAll('#aus .chip').length > 0")
        assert page.evaluate(f"{drop}('dropped.png', 1000)") == "ready"
        assert page.evaluate("document.querySelector('#filename').textContent") == "dropped.png"
        assert page.evaluate(f"{drop}('huge.png', 2 * 1024 * 1024)") == "error"  # refused before any upload
        assert "limit is 1.0 MiB" in page.evaluate("document.querySelector('#error').textContent")
        assert page.evaluate("document.querySelector('#describe').disabled")


def test_page_describes_a_video_with_its_timeline(page, tiny_run_dir, tmp_path, artifacts):
    from test_video import LENGTH_S, NearestFaceCaptioner, expression_face, write_clip

    base = Captioner.from_export(tiny_run_dir / "export")
    scripted = NearestFaceCaptioner(**{f.name: getattr(base, f.name) for f in fields(Captioner)})
    scripted.references = {n: scripted.preprocess([expression_face(n)])[0] for n in ("neutral", "smile")}
    clip = write_clip(tmp_path / "clip.webm", codec="libvpx")
    earlier = len(page.problems())  # the error test's refused upload is logged by the browser
    with background_server(create_app(scripted, video_fps=2)) as url:
        assert _describe_in_page(page, url, clip) == "done", page.evaluate("error.textContent")
        page.wait_for("document.querySelector('#timeline').naturalWidth > 0")
    assert page.evaluate("document.querySelector('#video-result').hidden") is False
    rows = page.evaluate("[...document.querySelectorAll('#frames tbody tr')].map(r => r.cells[0].textContent + ' ' +"
                         " r.cells[2].textContent)")
    assert len(rows) == int(LENGTH_S * 2) and rows[3] == "1.50 s —" and rows[4] == "2.00 s AU6 AU12"
    assert _chips(page, "#aus .chip.on") == ["AU6 cheek raiser", "AU12 lip corner puller"]
    assert sorted(_chips(page, "#emotions .chip")) == ["happiness", "neutral"]
    assert page.evaluate("document.querySelector('#video-preview').hidden") is False
    assert page.problems()[earlier:] == []
    shot = page.screenshot(artifacts / "expblip-page-video.png")
    print(f"screenshot: {shot}")


def test_page_sends_the_api_key(page, captioner, tmp_path):
    face = next(iter(synthetic_records(1, seed=5)))["image"]
    face.save(tmp_path / "face.png")
    with background_server(create_app(captioner, gen=GEN, api_key="page-key")) as url:
        assert _describe_in_page(page, url, tmp_path / "face.png") == "error"
        assert "Authorization" in page.evaluate("document.querySelector('#error').textContent")
        assert page.evaluate("document.querySelector('#key-row').hidden") is False
        page.evaluate("document.querySelector('#apikey').value = 'page-key'")
        page.evaluate("document.querySelector('#describe').click()")
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state",
                              timeout=60)
    assert state == "done" and page.evaluate("document.querySelector('#caption').textContent")
