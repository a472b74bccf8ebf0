"""Bounded waits of the MpGI chat back end, against real servers on 127.0.0.1 that stall: one
that sends its headers and then one byte a second, one that accepts and never answers. Each
case is counted in the archive fault suite (``tests/archive_report.py``): a wait that ends
after its stated bound is ``past_deadline`` (target 0)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from archive_report import record
from conftest import EXAMPLE_SCENE
from fork_runner import run_cli
from http_helpers import StallServer

from hqrs_geo.errors import Cancelled, InputError, OptionError
from hqrs_geo.mpgi.backends import ChatRequest, make_backend
from hqrs_geo.mpgi.recipe import load_recipe

SLACK = 1.5  # seconds a stopped wait may take beyond its bound on a busy 2-core machine


@pytest.fixture
def stall(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    servers: list[StallServer] = []

    def start(drip: bool = True) -> StallServer:
        servers.append(StallServer(drip, path="/v1"))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def requests(n: int) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": f"tile {i}"}]) for i in range(n)]


def backend(url: str, **options):
    return make_backend({"type": "openai", "base_url": url, "model": "m", **options})


def timed_failure(call, bound: float) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises((InputError, Cancelled)) as caught:
        call()
    took = time.monotonic() - started
    text = str(caught.value)
    clean = "\n" not in text and len(text) < 400
    record(clean=int(clean), internal=int(not clean), past_deadline=int(took > bound + SLACK))
    assert clean, text
    assert took <= bound + SLACK, f"{took:.1f}s, bound {bound}s"
    return caught.value, took


@pytest.mark.parametrize("drip", [True, False], ids=["drip", "silent"])
def test_a_stalling_server_ends_within_timeout_times_attempts(stall, drip):
    """timeout 1, one retry after 0.05-0.075 s: the request ends within 2 * 1 + 0.075 s whether the
    server drips its body or never answers (the watchdog shuts the socket, not only a socket timeout)."""
    server = stall(drip)
    err, took = timed_failure(lambda: backend(server.url, timeout=1, retries=1, backoff=0.05)
                              .complete(requests(1)), 2.075)
    assert "within 1s (2 attempts)" in str(err) and took >= 1.9 and server.connections == 2


def test_concurrent_requests_end_with_the_first_failure(stall):
    """8 requests, 4 at a time, all dripping: the first to fail for good stops the others in
    flight (connections shut, no retries): the call ends about when one request would."""
    server = stall(True)
    err, _ = timed_failure(lambda: backend(server.url, timeout=1, retries=1, backoff=0.05, concurrency=4)
                           .complete(requests(8)), 2.075)
    assert isinstance(err, InputError) and server.connections <= 8


def test_close_from_another_thread_stops_a_dripping_request(stall):
    server = stall(True)
    chat = backend(server.url, timeout=60, retries=3, concurrency=2)
    threading.Timer(1.0, chat.close).start()
    err, took = timed_failure(lambda: chat.complete(requests(2)), 1.0)
    assert isinstance(err, Cancelled)


@pytest.mark.parametrize("key, value", [
    ("timeout", "inf"), ("timeout", "nan"), ("timeout", "0"), ("timeout", "3601"), ("backoff", "1e308"),
    ("max_backoff", "-1"), ("retries", "1100"), ("retries", "-1"), ("concurrency", "1000"),
])
def test_recipe_values_out_of_range_are_one_line_errors_naming_the_key(tmp_path, key, value):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[vlm]\ntype = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n{key} = {value}\n')
    with pytest.raises(OptionError) as caught:
        load_recipe(str(recipe))
    text = str(caught.value)
    ok = "\n" not in text and f"[vlm] back end option {key}:" in text and text.count("fix") == 1
    record(clean=int(ok), internal=int(not ok))
    assert ok, text


def test_sigterm_during_a_dripping_wait_exits_130_within_seconds(stall, tmp_path):
    """The CLI run waits on a server dripping one byte a second (timeout 60, 4 retries: minutes);
    SIGTERM ends it with exit 130 and the cancel message within a few seconds."""
    server = stall(True)
    layer = tmp_path / "t.gpkg"
    assert run_cli("tile", str(EXAMPLE_SCENE), "-o", str(layer), "--tile-size", "500", "--quiet").returncode == 0
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[vlm]\ntype = "openai"\nbase_url = "{server.url}"\nmodel = "m"\ntimeout = 60\n'
                      f'[llm]\ntype = "openai"\nbase_url = "{server.url}"\nmodel = "m"\n[caption_model]\nname = ""\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-m", "hqrs_geo", "mpgi", str(layer), "--recipe", str(recipe)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while server.connections < 1 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        assert server.connections >= 1, child.communicate()[1] if child.poll() is not None else "no request"
        time.sleep(0.5)
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    ok = child.returncode == 130 and "cancelled" in err and "Traceback" not in err
    record(clean=int(ok), internal=int("Traceback" in err), past_deadline=int(took > 5))
    assert ok, (child.returncode, err)
    assert took <= 5, f"{took:.1f}s after SIGTERM"
