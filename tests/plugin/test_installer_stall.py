"""The plugin installer against a wheel URL that stalls (a real server on 127.0.0.1 that sends
its headers then a byte a second, or never answers): the pip step is stopped within its stated
no-progress limit with a one-line message naming the host; cancel still stops it at once.
Counted in the archive fault suite."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from archive_report import record
from http_helpers import StallServer

from qgis_plugin.core import installer
from qgis_plugin.core.runner import EngineError

STALL = 4.0  # seconds without progress that stop the step here (180 s by default)
WHEEL = {"path": "/hqrs_geo-0.1.0-py3-none-any.whl", "content_type": "application/octet-stream",
         "byte": b"P", "length": 50_000_000}
SLACK = 8.0  # pip's start-up, SIGTERM and the pipe closing on a busy 2-core machine


@pytest.fixture
def pip_env(monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def download_step(url: str, folder) -> installer.Step:
    """A pip step installing the wheel as the install step would (the same pip options)."""
    options = installer.InstallOptions(venv=str(folder / "venv"), wheel=url)
    target = str(folder / "target")  # pip install --target: nothing goes into the running environment
    return installer.Step("hqrs_geo", [sys.executable, "-m", "pip", "install", "--no-deps", "--target", target,
                                       *installer.pip_args(options, os.devnull), url], name="hqrs_geo wheel")


@pytest.mark.parametrize("drip", [True, False], ids=["drip", "silent"])
def test_a_stalled_wheel_download_ends_within_its_limit(tmp_path, pip_env, drip):
    server = StallServer(drip, **WHEEL)
    try:
        options = installer.InstallOptions(venv=str(tmp_path / "venv"), wheel=server.url, stall_seconds=STALL)
        started = time.monotonic()
        with pytest.raises(EngineError) as caught:
            installer.Installer(options).run_step(download_step(server.url, tmp_path))
        took = time.monotonic() - started
    finally:
        server.close()
    text = str(caught.value)
    ok = "\n" not in text and "127.0.0.1" in text and "stalled" in text and caught.value.kind == "network"
    record(clean=int(ok), internal=int(not ok), past_deadline=int(took > STALL + SLACK))
    assert ok, text
    assert took <= STALL + SLACK, f"{took:.1f}s"


def test_cancel_still_stops_a_stalled_download(tmp_path, pip_env):
    server = StallServer(True, **WHEEL)
    cancelled = threading.Event()
    try:
        options = installer.InstallOptions(venv=str(tmp_path / "venv"), wheel=server.url)  # the default limit
        threading.Timer(2.0, cancelled.set).start()
        started = time.monotonic()
        with pytest.raises(EngineError) as caught:
            installer.Installer(options, is_cancelled=cancelled.is_set).run_step(download_step(server.url, tmp_path))
        took = time.monotonic() - started
    finally:
        server.close()
    ok = caught.value.kind == "cancelled"
    record(clean=int(ok), internal=int(not ok), past_deadline=int(took > 2.0 + SLACK))
    assert ok and took <= 2.0 + SLACK, (str(caught.value), took)
