"""Device choice that tells the truth, with the real engine probe of this machine's Python: the
settings dialog offers only the devices the engine reports, a device it does not have is a
settings message (what to choose instead), never the engine set-up page."""
from __future__ import annotations

import sys

import pytest
from qgis.PyQt import sip
from qgis_fixtures import close_dock, new_dock, qgis, wait_for  # noqa: F401  (fixtures)

from qgis_plugin.core import engine, settings

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin")


@pytest.fixture(scope="module")
def this_engine(qgis):
    """The engine is this test's Python (one probe per device for the module: each imports torch in
    a child process); the settings are restored afterwards."""
    before = settings.values()
    settings.set_values({"interpreter": sys.executable})
    yield engine.probe(sys.executable, "auto")
    settings.set_values(before)


def gpu_free() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_probe_reports_the_devices_torch_sees(this_engine):
    import torch

    info = this_engine
    assert info.ok and info.devices[0] == "cpu"
    assert ("cuda" in info.devices) == torch.cuda.is_available()
    assert [d for d in info.devices if d.startswith("cuda")] == \
        ["cuda" if i == 0 else f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert ("mps" in info.devices) == (sys.platform == "darwin" and torch.backends.mps.is_available())
    assert info.device_label("cpu") == f"cpu ({torch.get_num_threads()} threads)"


@pytest.mark.skipif(not gpu_free(), reason="this machine has a CUDA GPU")
def test_a_missing_gpu_is_a_settings_message_with_what_to_choose(this_engine):
    wrong = engine.probe(sys.executable, "cuda")
    assert not wrong.ok and wrong.installed and wrong.device_problem is wrong.problem
    assert wrong.problem.text == ("device cuda was chosen, but torch sees no CUDA GPU here; choose auto or cpu "
                                  "as the device in HQRS settings")
    assert wrong.summary.startswith("hqrs_geo ") and "choose auto or cpu" in wrong.summary
    assert engine.cached(sys.executable, "cuda") is wrong  # the engine works: kept (a setting to change)


@pytest.mark.skipif(not gpu_free(), reason="this machine has a CUDA GPU")
def test_settings_dialog_offers_only_the_engines_devices(this_engine):
    from qgis_plugin.widgets.settings_dialog import SettingsDialog

    settings.set_value("device", "cuda")
    dialog = SettingsDialog()
    wait_for(lambda: dialog.devices is not None)
    items = [dialog.device.itemData(i) for i in range(dialog.device.count())]
    assert items == ["auto", "cpu", "cuda"]  # cuda: only because it is the saved setting
    assert dialog.device.currentText() == "cuda (not available here)"
    note = dialog.device_note.text()
    assert "cuda is not available here" in note and "choose auto or cpu" in note and "mps" not in note
    dialog.save()  # refused: the setting stays, the note says what to choose
    assert settings.value("device") == "cuda" and dialog.result() == 0
    dialog.device.setCurrentIndex(dialog.device.findData("cpu"))
    assert "this engine can use: auto, cpu" in dialog.device_note.text()
    dialog.save()
    assert settings.value("device") == "cpu" and dialog.result() == 1
    again = SettingsDialog()  # a cached probe: the list at once, without the unavailable device
    assert [again.device.itemData(i) for i in range(again.device.count())] == ["auto", "cpu"]
    for widget in (dialog, again):
        sip.delete(widget)


@pytest.mark.skipif(not gpu_free(), reason="this machine has a CUDA GPU")
def test_dock_with_a_missing_gpu_stays_on_the_search_page(this_engine):
    settings.set_value("device", "cuda")
    dock = new_dock()
    try:
        dock.check_engine()
        wait_for(lambda: "checking" not in dock.engine_label.text())
        assert dock.pages.currentIndex() == 0  # the search page, not the set-up page
        label, status = dock.engine_label.text(), dock.status.text()
        assert "No engine yet" not in label + status and "Install engine" not in label + status
        assert "choose auto or cpu as the device in HQRS settings" in status
        assert "choose auto or cpu" in label and "hqrs_geo " in label
        settings.set_value("device", "cpu")  # the advice followed: the message goes
        wait_for(lambda: "checking" not in dock.engine_label.text())
        assert dock.status.text().startswith("device ready: cpu") and "choose" not in dock.engine_label.text()
        # the set-up panel, opened anyway, says the engine is ready (what its check found, without
        # the GPU and package index look-ups)
        dock.setup_panel._checked((engine.probe(sys.executable, "cuda"), None, True, True), None)
        text = dock.setup_panel.status.text()
        assert text.startswith("<b>Engine ready</b>") and "No engine yet" not in text and "choose auto or cpu" in text
    finally:
        close_dock(dock)
