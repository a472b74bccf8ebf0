"""Search sessions with real ``serve-search`` processes: one process per model serves every layer
that model embedded (no model reload per layer), answers equal those of a process of the layer's
own, a layer of another model gets its own process."""
from __future__ import annotations

import shutil
import sys
import time

import pytest
from qgis_fixtures import embedded_example, qgis  # noqa: F401  (fixtures)
from tiny_models import TINY_CLIP

from qgis_plugin.core import sessions
from qgis_plugin.core.runner import EngineError

QUERY = {"text": "a river with a bridge", "k": 5}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip_checkpoint):
    """Two layers embedded by the tiny CLIP (16 tiles each) and one by another model (its
    checkpoint differs: another model as far as the vectors go)."""
    folder = tmp_path_factory.mktemp("sessions")
    first = embedded_example(folder / "first.gpkg", tiny_clip_checkpoint)
    second = shutil.copy(first, folder / "second.gpkg")
    return first, second


MODEL = f"{TINY_CLIP}:tiny_clip"  # what the run record names: model and checkpoint


def key(layer, model: str = MODEL, checkpoint: str = "") -> sessions.SessionKey:
    return sessions.SessionKey(sys.executable, str(layer), device="cpu", checkpoint=checkpoint, model=model)


def ranked(response: dict) -> list:
    return [(r["tile_id"], round(r["score"], 5)) for r in response["results"]]


def test_one_process_serves_every_layer_of_a_model(qgis, embedded, tiny_clip_checkpoint):
    first, second = embedded
    sessions.close_all()
    started = time.perf_counter()
    a = sessions.get_session(key(first))
    answer_a = a.request(QUERY)
    first_query = time.perf_counter() - started
    b = sessions.get_session(key(second))
    assert b.model_loaded  # B's model is already loaded in A's process
    started = time.perf_counter()
    answer_b = b.request(QUERY)
    second_layer_first_query = time.perf_counter() - started
    assert a.running and b.running and b.info["tiles"] == 16 and b.info["model"] == MODEL
    assert a.process is b.process and len(sessions.running_processes()) == 1
    assert len(sessions.running_sessions()) == 2
    # callers that do not know the model (Processing) find the process that has their layer open
    for layer in (first, second):
        bare = sessions.get_session(sessions.SessionKey(sys.executable, str(layer), device="cpu"))
        assert bare.model_loaded and ranked(bare.request(QUERY)) == ranked(answer_a)
        assert bare.process is a.process
    # a model that did not embed the layer: refused in one line, the shared process untouched
    other = sessions.get_session(key(first, model="hqrs-mini-clip"))
    with pytest.raises(EngineError, match="no embeddings made by hqrs-mini-clip") as caught:
        other.request(QUERY)
    assert "\n" not in str(caught.value) and a.running and len(sessions.running_processes()) == 1
    # the same answers as a process of B's own (the way every layer was searched before)
    sessions.close_all()
    started = time.perf_counter()
    own = sessions.get_session(key(second))
    reference = own.request(QUERY)
    own_process_first_query = time.perf_counter() - started
    assert ranked(answer_b) == ranked(reference) == ranked(answer_a)  # copies of one layer
    print(f"\nfirst layer, first query {first_query:.2f} s; second layer, first query: "
          f"{second_layer_first_query:.3f} s in the shared process, {own_process_first_query:.2f} s in a "
          "process of its own (model loaded again)")
    assert second_layer_first_query < own_process_first_query / 3


def test_stop_while_loading_cancels_and_closing_a_layer_keeps_the_process(qgis, embedded):
    import threading

    first, second = embedded
    sessions.close_all()
    a = sessions.get_session(key(first))
    errors: list = []
    thread = threading.Thread(target=lambda: _catch(a.start, errors))
    thread.start()
    deadline = time.monotonic() + 30
    while not (a.process is not None and a.process.loading) and time.monotonic() < deadline:
        time.sleep(0.01)
    a.stop()
    thread.join(60)
    assert errors and errors[0].kind == "cancelled"
    a.request(QUERY)
    b = sessions.get_session(key(second))
    b.request(QUERY)
    b.close()
    assert a.running and not b.running
    assert a.request(QUERY)["results"]


def _catch(fn, errors: list) -> None:
    try:
        fn()
    except EngineError as exc:
        errors.append(exc)
