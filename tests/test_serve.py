"""`xpsr serve` tested for real: the CLI starts the Gradio server on 127.0.0.1 in a subprocess (tiny model, CPU,
no network); gradio_client submits images through the API and headless Chromium drives the page."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xpsr.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "serve" / "tiny_cpu.yaml"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MAX_OUTPUT_PIXELS = 150 * 150  # small, so the "too large" upload is cheap to make
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio_client's telemetry thread reads it


def _photo(path: Path, width: int, height: int) -> Path:
    from skimage import data

    Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    with opener.open(url, timeout=5) as r:
        return r.read()


@contextlib.contextmanager
def _serving(folder: Path, *overrides: str):
    """`xpsr serve OVERRIDES` in a subprocess on a free port, until the page answers; yields its URL."""
    port = _free_port()
    # one torch thread: the test process and the browser run beside the server, and tiny inputs need no more
    env = dict(os.environ, GRADIO_TEMP_DIR=str(folder / "gradio"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "xpsr.cli", "serve", *overrides, "host=127.0.0.1", f"port={port}",
           f"output_dir={folder / 'results'}"]
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 300  # imports take a while on a busy machine
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"xpsr serve exited with {proc.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                _get(url)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"xpsr serve did not answer in time:\n{(folder / 'server.log').read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`xpsr serve` of the tiny CPU config; yields (url, folder with results/ and server.log)."""
    folder = tmp_path_factory.mktemp("serve")
    with _serving(folder, "--config", str(TINY), f"max_output_pixels={MAX_OUTPUT_PIXELS}") as url:
        yield url, folder


def test_a_bare_xpsr_serve_starts_on_the_tiny_model_with_no_downloads(tmp_path):
    """What a fresh install gets from `xpsr serve` with no config: the page, on the tiny model built in code."""
    with _serving(tmp_path / "bare") as url:
        page = _get(url).decode("utf-8", errors="replace")
    assert "XPSR super-resolution" in page and "fresh tiny" in page  # the heading names the model it built
    log = (tmp_path / "bare" / "server.log").read_text()
    assert "Traceback" not in log


def client_file(path: Path):
    from gradio_client import handle_file

    return handle_file(str(path))


def _submit(client, path: Path, upscale: int = 2, quality: str = "", seed: int = 0):
    return client.predict(client_file(path), "", quality, 2, 4.5, seed, "adain", upscale, True, 512,
                          api_name="/super_resolve")


def test_client_gets_the_image_at_input_size_times_upscale(server, tmp_path):
    from gradio_client import Client

    url, folder = server
    client = Client(url, verbose=False, analytics_enabled=False)
    lr = _photo(tmp_path / "astronaut.png", 32, 24)
    quality, content = client.predict(client_file(lr), api_name="/prompts")
    assert content == "" and quality.startswith("This is a ")  # the heuristic, no captioner configured

    (before, after), used, info, png = _submit(client, lr, upscale=2, quality=quality)
    for path in (before, after, png):
        assert Image.open(path).size == (64, 48)
    assert f"quality: {quality}" in used and "Peak memory" in info and "Time" in info
    written = sorted((folder / "results").glob("astronaut_xpsr_x2_*.png"))
    assert written and Image.open(written[-1]).size == (64, 48)  # the download is also kept in output_dir
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(written[-1])))

    # same seed, same bytes; another upscale factor gives another size
    (_, again), _, _, _ = _submit(client, lr, upscale=2, quality=quality)
    assert np.array_equal(np.asarray(Image.open(after)), np.asarray(Image.open(again)))
    (_, x3), _, _, _ = _submit(client, lr, upscale=3, quality=quality)
    assert Image.open(x3).size == (96, 72)


def test_bad_uploads_get_a_readable_message(server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False, analytics_enabled=False)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = _photo(tmp_path / "photo.png", 40, 40)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    big = _photo(tmp_path / "big.png", 100, 100)  # x2 -> 40,000 output pixels > MAX_OUTPUT_PIXELS
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expected = {text: "notes.png: not an image this app can read", empty: "empty.png: the file is empty",
                truncated: "truncated.png: cannot decode",
                big: f"above max_output_pixels={MAX_OUTPUT_PIXELS:,}"}  # the message of xpsr infer
    for path, message in expected.items():
        with pytest.raises(AppError) as info:
            _submit(client, path)
        assert message in str(info.value) and "Traceback" not in str(info.value)
    (_, after), _, _, _ = _submit(client, good)  # the server is still fine
    assert Image.open(after).size == (80, 80)


def test_browser_upload_run_result(server, tmp_path):
    """Headless Chromium (Debian's package, driven by Selenium through /usr/bin/chromedriver): upload, run,
    see the result; then a non-image upload shows our message in the page. Saves a screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), \
        "install Debian's browser: apt-get install -y chromium chromium-driver (.ci/run does it)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}"):
        options.add_argument(flag)
    # a driver path in Service means Selenium Manager is never asked to download anything
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server[0])
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#lr_input input[type=file]"))
        upload.send_keys(str(_photo(tmp_path / "astronaut.png", 48, 36)))
        quality = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#quality_prompt textarea")
                             .get_attribute("value"))
        assert quality.startswith("This is a ")  # filled on upload by the heuristic
        driver.find_element(By.CSS_SELECTOR, "#run_button").click()
        images = wait.until(lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#result img")
                                       if i.get_attribute("src") and d.execute_script(
                                           "return arguments[0].complete && arguments[0].naturalWidth", i)])
        sizes = {tuple(driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i))
                 for i in images}
        assert len(images) == 2 and sizes == {(96, 72)}  # before and after, 48x36 x2
        wait.until(lambda d: "Peak memory" in d.find_element(By.CSS_SELECTOR, "#run_info").text)
        assert "astronaut_xpsr_x2_" in driver.find_element(By.CSS_SELECTOR, "#download").text
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert Image.open(shot).size[0] > 0

        # a file that is not an image: our message in the page (a toast), no traceback
        driver.find_element(By.CSS_SELECTOR, "#lr_input button[aria-label='Remove Image']").click()
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#lr_input input[type=file]")).send_keys(str(bad))
        message = "notes.png: not an image this app can read"
        wait.until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(tmp_path / "serve_error.png"))
        print(f"screenshot: {tmp_path / 'serve_error.png'}")
    finally:
        driver.quit()


def test_serve_config_and_tiling_rules():
    """Large processing sizes are tiled whatever the control says; small ones follow it."""
    from xpsr.apps.serve.engine import Controls, infer_config

    cfg = load_config(ServeConfig, TINY, ["untiled_max_side=256"])
    controls = Controls(steps=2, guidance=4.5, seed=1, color_fix="wavelet", upscale=4, tiled=False, tile_px=256)
    small, notes = infer_config(cfg, controls, 16, 16)
    assert (small.latent_tile, small.vae_tile, notes) == (0, 0, [])
    large, notes = infer_config(cfg, controls, 100, 80)  # 400x320 px > 256
    assert (large.latent_tile, large.latent_overlap, large.vae_tile) == (32, 16, cfg.vae_tile)
    assert "tiling kept on" in notes[0]
    assert (large.num_inference_steps, large.seed, large.color_fix, large.upscale, large.prompts) == \
        (2, 1, "wavelet", 4, "fixed")


def test_content_prompt_from_the_configured_captioner(tmp_path):
    """content_captioner=<caption config>: loaded once on first use, its caption fills the content prompt."""
    from xpsr.apps.serve.engine import Engine, RequestError
    from xpsr.captions.heuristic import describe, measure
    from xpsr.captions.run import make_captioner
    from xpsr.captions.tiny_llava import build_tiny_llava
    from xpsr.config import CaptionConfig

    llava = build_tiny_llava(tmp_path / "llava")
    content_yaml = tmp_path / "content.yaml"
    content_yaml.write_text(f"images: ???\ncache: ???\nkind: content\ncaptioner: llava\nmodel: {llava}\n"
                            "max_new_tokens: 6\ndtype: fp32\n")
    engine = Engine(load_config(ServeConfig, TINY, [f"content_captioner={content_yaml}"]), tmp_path / "out")
    lr = np.asarray(Image.open(_photo(tmp_path / "a.png", 40, 30)))
    assert engine._captioner is None  # nothing loaded before the first upload
    quality, content = engine.prompts(lr)
    captioner = engine._captioner
    expected = make_captioner(load_config(CaptionConfig, content_yaml, ["images=x", "cache=y"]), "cpu")
    assert content and content == expected.caption([lr])[0] and quality == describe(measure(lr))
    assert engine.prompts(lr) == (quality, content) and engine._captioner is captioner  # loaded once

    wrong = load_config(ServeConfig, TINY, [f"content_captioner={REPO}/configs/caption/heuristic_quality.yaml"])
    with pytest.raises(RequestError, match="writes quality prompts"):
        Engine(wrong, tmp_path / "out2")  # at startup, not at the first upload


def test_engine_calls_the_pipeline_and_tiles_large_inputs(tmp_path):
    """The app's result is super_resolve's, bytes for bytes; above untiled_max_side tiling stays on."""
    import dataclasses

    import torch

    from xpsr.apps.serve.engine import Controls, Engine, infer_config
    from xpsr.inference.pipeline import super_resolve

    engine = Engine(load_config(ServeConfig, TINY, ["untiled_max_side=64"]), tmp_path / "out")
    lr_path = _photo(tmp_path / "wide.png", 40, 32)  # x2 -> 80x64 px: 10x8 latents, 2 tiles of 8
    controls = Controls(steps=2, guidance=4.5, seed=3, color_fix="adain", upscale=2, tiled=False, tile_px=64)
    result = engine.run(lr_path, "wide.png", "a photo", "", controls)
    assert result.sr.shape == (64, 80, 3) and any("tiling kept on" in n for n in result.notes)
    assert result.peak_rss_mb > 100 and result.cuda_peak_mb is None and result.png.parent == tmp_path / "out"

    lr = np.asarray(Image.open(lr_path).convert("RGB"))
    icfg, _ = infer_config(engine.cfg, controls, 32, 40)
    direct = super_resolve(engine.modules, lr, "a photo", result.prompts["quality"], icfg, torch.device("cpu"))
    assert np.array_equal(result.sr, direct)
    engine.cfg = dataclasses.replace(engine.cfg, untiled_max_side=4096)  # now the control decides: untiled
    untiled = engine.run(lr_path, "wide.png", "a photo", "", controls)
    assert not untiled.notes[1:] and not np.array_equal(untiled.sr, result.sr)
