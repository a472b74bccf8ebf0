"""Shared fixtures: rasters written with rasterio in the tests, the real scenes, and a hermetic session.

At import (before QGIS, Qt, pip, huggingface_hub, torch or Ray read them) the test session gets
its own HOME, XDG folders, QGIS profile, engine folder (empty: no engine), HQRS_GEO_HOME,
HF_HOME and TORCH_HOME, all under one temporary folder (:data:`TEST_HOME`) removed at the end;
child processes inherit them. PATH, the venv and PYTHONPATH are kept. Nothing a user installed or
configured in their home (an engine, QGIS settings, caches) can change a result.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# variable -> folder under TEST_HOME (HOME first: the XDG folders are where they are in a real home)
HERMETIC_DIRS = {
    "HOME": "home",
    "XDG_CONFIG_HOME": "home/.config",
    "XDG_DATA_HOME": "home/.local/share",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_STATE_HOME": "home/.local/state",
    "XDG_RUNTIME_DIR": "runtime",
    "QGIS_CUSTOM_CONFIG_PATH": "qgis",  # a standalone QgsApplication's profiles folder
    "HQRS_GEO_ENGINE_DIR": "engine",    # empty: the plugin finds no installed engine
    "HQRS_GEO_HOME": "hqrs_geo",        # checkpoint cache
    "HF_HOME": "huggingface",
    "TORCH_HOME": "torch",
}
HERMETIC_VARS = tuple(HERMETIC_DIRS)


def _isolate() -> Path:
    """Point every HERMETIC_DIRS variable at a new folder under one temporary folder; return it."""
    home = Path(tempfile.mkdtemp(prefix="hqrs-tests-"))
    for name, relative in HERMETIC_DIRS.items():
        folder = home / relative
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    (home / "runtime").chmod(0o700)  # Qt insists on a private runtime folder
    return home


TEST_HOME = _isolate()

# One math thread per process (torch's OpenMP, MKL; OpenBLAS follows OMP_NUM_THREADS), also in child
# processes: the suite runs a pytest-xdist worker per core and most tests start children, so more
# threads only oversubscribe the cores, and OpenMP's spinning threads made the small products of
# the LLM tests up to 200x dearer in CPU on 2 busy cores. A value set by the caller is kept.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402  (after the isolation: nothing may read the real home first)
import pytest  # noqa: E402
import rasterio  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.crs import CRS  # noqa: E402

EXAMPLE_SCENE = ROOT / "examples" / "data" / "urban_river_025m_epsg28992.tif"

# Committed small crops of real scenes (MIT / public domain; tests/data/README.md says how each was cut)
TEST_DATA = ROOT / "tests" / "data"
NAIP_SCENE = TEST_DATA / "scenes" / "naip_rgbn_5m_epsg26914_256px.tif"  # R, G, B, NIR; DEFLATE; nodata 0
DRONE_SCENE = TEST_DATA / "scenes" / "drone_farm_002m_epsg32753_192px.tif"  # RGB, 1.8 cm, striped, nodata 0
UCM_SAMPLES = TEST_DATA / "ucm_val_samples" / "dataset.json"  # the first UCM val image of each of 21 classes

# The shared data beside the clone (``../shared``; CI has it, a user's clone has not). Tests that
# need it skip without it, saying which file (:func:`shared_data`). HQRS_TEST_SHARED moves it
# (HQRS_TEST_SHARED=/nonexistent shows what runs without it).
SHARED = Path(os.environ.get("HQRS_TEST_SHARED") or ROOT.parent / "shared")
SHARED_DATA = SHARED / "data"
SHARED_SCENES = SHARED_DATA / "scenes"


def shared_missing(*relative: str) -> str | None:
    """Why a test needing these files of the shared data (relative to ``../shared/data``) cannot run, or None."""
    missing = [name for name in relative if not (SHARED_DATA / name).exists()]
    if not missing:
        return None
    where = os.environ.get("HQRS_TEST_SHARED") or "../shared"
    return f"needs {', '.join(f'{where}/data/{name}' for name in missing)}: not found"


def needs_shared(*relative: str) -> pytest.MarkDecorator:
    """A skip mark for a test (or parameter) that needs these files of the shared data."""
    reason = shared_missing(*relative)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def shared_data(*relative: str) -> list[Path]:
    """The paths of these files of the shared data; skips the calling test (or fixture) without them."""
    reason = shared_missing(*relative)
    if reason:
        pytest.skip(reason)
    return [SHARED_DATA / name for name in relative]


GEOGRAPHIC_RES = 4e-6  # degrees: about 0.27 m east-west and 0.44 m north-south at the scene's 52° N


def geographic_scene() -> Path:
    """The example scene warped to EPSG:4326 with an alpha band (R, G, B, alpha; DEFLATE; 0 outside
    the source): a geographic scene laid out like the Swellendam aerials of ``../shared``, on a
    grid fixed by :data:`GEOGRAPHIC_RES` (913 x 566 px). Made once per session under TEST_HOME."""
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.warp import reproject, transform_bounds

    path = TEST_HOME / "scenes" / "urban_river_epsg4326.tif"
    if path.exists():
        return path
    res = GEOGRAPHIC_RES
    with rasterio.open(EXAMPLE_SCENE) as src:
        left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        left, top = np.floor(left / res) * res, np.ceil(top / res) * res
        width, height = int(np.ceil((right - left) / res)), int(np.ceil((top - bottom) / res))
        transform = Affine(res, 0, left, 0, -res, top)
        pixels = np.zeros((4, height, width), np.uint8)
        source = np.concatenate([src.read(), np.full((1, src.height, src.width), 255, np.uint8)])
        for band in range(4):
            reproject(source[band], pixels[band], src_transform=src.transform, src_crs=src.crs,
                      dst_transform=transform, dst_crs="EPSG:4326", resampling=Resampling.nearest)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=width, height=height, count=4, dtype="uint8",
                       crs="EPSG:4326", transform=transform, compress="deflate", photometric="RGB",
                       alpha="YES") as dst:
        dst.write(pixels)
        dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)
    tmp.replace(path)
    return path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def pytest_unconfigure(config):
    """Remove the session's temporary home."""
    shutil.rmtree(TEST_HOME, ignore_errors=True)


def write_raster(
    path: Path,
    data: np.ndarray,
    transform: Affine = Affine(0.5, 0, 500000, 0, -0.5, 4000000),
    crs: str | None = "EPSG:32633",
    nodata: float | None = None,
    colorinterp=None,
    tiled: bool = True,
    **profile,
) -> Path:
    """Write ``data`` (bands, H, W) as a GeoTIFF and return its path."""
    count, height, width = data.shape
    opts = dict(
        driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
        transform=transform, crs=CRS.from_user_input(crs) if crs else None, nodata=nodata,
    )
    if tiled and width >= 16 and height >= 16:
        opts.update(tiled=True, blockxsize=16 * max(1, min(width, 256) // 16),
                    blockysize=16 * max(1, min(height, 256) // 16))
    opts.update(profile)
    with rasterio.open(path, "w", **opts) as dst:
        dst.write(data)
        if colorinterp:
            dst.colorinterp = colorinterp
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def rgb_raster(tmp_path, rng) -> Path:
    """1000 x 700 uint8 RGB in UTM 33N, 0.5 m pixels."""
    data = rng.integers(0, 255, size=(3, 700, 1000), dtype=np.uint8)
    return write_raster(tmp_path / "rgb.tif", data)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m hqrs_geo ARGS`` in a child process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hqrs_geo", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, **kwargs,
    )


@pytest.fixture(scope="session", autouse=True)
def model_environment(tmp_path_factory):
    """Tiny architectures visible to this process and to CLI child processes; no hub access."""
    from tiny_models import register_tiny_configs

    configs = tmp_path_factory.mktemp("model_configs")
    register_tiny_configs(configs)
    os.environ["HQRS_GEO_MODEL_CONFIGS"] = str(configs)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield configs


def _save_tiny(factory, name: str) -> Path:
    import torch
    from tiny_models import build_tiny

    model, _, _ = build_tiny(name, seed=0)
    path = factory.mktemp("ckpt") / f"{'tiny_coca' if 'coca' in name else 'tiny_clip'}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory, model_environment):
    """A tiny CLIP's weights saved as a plain state_dict file."""
    from tiny_models import TINY_CLIP

    return _save_tiny(tmp_path_factory, TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_coca_checkpoint(tmp_path_factory, model_environment):
    """A tiny CoCa's weights saved as a plain state_dict file."""
    from tiny_models import TINY_COCA

    return _save_tiny(tmp_path_factory, TINY_COCA)


@pytest.fixture
def example_layer(tmp_path) -> Path:
    """The example scene tiled at 125 px (64 tiles) into a GeoPackage."""
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    out = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, out, TileConfig(tile_size=125))
    return out


def write_sparse_scene(path: Path, size: int = 30000) -> Path:
    """A huge, almost empty GeoTIFF (nodata 0, one written block): slow to tile, quick to make."""
    from rasterio.windows import Window

    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", nodata=0,
                       tiled=True, blockxsize=256, blockysize=256, sparse_ok=True, crs="EPSG:32633",
                       transform=Affine(1, 0, 500000, 0, -1, 4000000)) as dst:
        dst.write(np.full((3, 256, 256), 7, np.uint8), window=Window(0, 0, 256, 256))
    return path


# What `make test-fast` leaves out: tests of seconds to minutes each (a node id, or the start of
# one: a file, a test with all its parameters). One list, so the working loop's cut is seen at once.
SLOW = (
    "tests/test_benchmarks.py",                        # every benchmark's smoke run, in child processes
    "tests/test_change_demo.py",                       # the change demo: two dates embedded and captioned
    "tests/test_hermetic.py",                          # a child pytest in a planted user home
    "tests/mpgi/test_backend_deadlines.py::test_sigterm_",  # a real CLI child process stopped by SIGTERM
    "tests/search/test_index_faults.py::test_serve_search_",  # a real serve-search child process
    "tests/test_faults.py::test_killed_",              # kill -9 / SIGTERM and resume, in child processes
    "tests/test_faults.py::test_stopped_finetune_resumes_bit_identical",
    "tests/engine/test_ray_engine.py",                 # real Ray clusters
    "tests/engine/test_ray_faults.py::test_a_",        # Ray clusters and local instances: nodes lost, tokens
    "tests/engine/test_ray_faults.py::test_sigterm_",
    "tests/mpgi/test_mpgi_pipeline.py",                # the real SmolLM2 over real tiles
    "tests/mpgi/test_mpgi_backends.py::test_smollm2_",
    "tests/mpgi/test_mpgi_backends.py::test_http_server_backed_by_smollm2",
    "tests/plugin/test_plugin_installer.py::test_first_run_installs_the_engine_and_searches_without_restarting",
    "tests/plugin/test_installer_index.py",            # real pip into new environments (stand-in wheels)
    "tests/plugin/test_processing.py::test_mpgi_captions_with_vector_facts_then_export_dataset",
    "tests/models/test_hub_download.py",               # downloads from a local hub in child processes
    "tests/tiling/test_memory.py",                     # a 40,000 px scene
    "tests/training/test_evaluation.py::test_eval_cli_on_ucm",
    "tests/training/test_evaluation.py::test_eval_caption_cli",
    "tests/training/test_evaluation.py::test_caption_metrics_behave",  # Java (METEOR, SPICE)
    "tests/training/test_training.py::test_finetune_cli_trains_and_refuses_bad_input",
    "tests/training/test_training.py::test_coca_training_has_both_losses_and_captions_after_loading",
    "tests/engine/test_engine.py::test_captions_match_direct_decoding",
    "tests/engine/test_engine.py::test_cli_",
    "tests/engine/test_partitioned.py::test_layer_commands_work_on_a_dataset",
    "tests/search/test_search_partitioned.py::test_serve_search_on_a_dataset",
    "tests/search/test_fewshot.py::test_serve_search_detect_layers_and_labels",  # a serve-search child, 3 layers
    "tests/cli/test_detect.py::test_detect_writes_columns_and_a_detection_layer",  # four CLI runs
    "tests/search/test_search_ivfpq.py::test_nprobe_and_rerank_are_calibrated",
    "tests/search/test_search_ivfpq.py::test_near_duplicates_raise_rerank",
    "tests/models/test_decoding.py::test_beam_search_",
    "tests/models/test_decoding.py::test_sampling_is_seeded",
    "tests/plugin/test_dock.py::test_settings_changes_restart_search_sessions",
    "tests/plugin/test_dock.py::test_layer_list_shows_tile_layers_with_their_embedding_models",
    "tests/plugin/test_dock.py::test_settings_dialog_round_trip_and_background_check",
    "tests/plugin/test_dock.py::test_zero_shot_classes_are_drawn_with_a_legend_over_the_imagery",  # classify CLI run
    "tests/plugin/test_processing.py",                 # Processing algorithms driving engine processes
    "tests/plugin/test_plugin_processing.py",
    "tests/plugin/test_fewshot_dock.py::test_labels_survive_closing_and_reopening",  # two engine sessions
    "tests/plugin/test_change_plugin.py::test_compare_",  # change runs: two dates tiled, embedded and compared
    "tests/plugin/test_fewshot_dock.py::test_detect_from_examples_processing",
    "tests/plugin/test_plugin_runner.py::test_probe_names_versions_and_device",
    "tests/plugin/test_web_layers.py::test_xyz_tile_layer_",  # an XYZ layer written, tiled by the engine, rendered
    "tests/plugin/test_sessions.py",                   # search processes loading models (three, two)
    "tests/plugin/test_plugin_runner.py::test_no_resource_warnings_from_processes",
    "tests/test_faults.py::test_layers_embedded_with_a_trusted_pickle_checkpoint",
    "tests/layer/test_dataset_faults.py::test_two_jobs_into_one_dataset_keep_every_part",  # two real jobs
)


def pytest_collection_modifyitems(config, items):
    """Mark the tests of :data:`SLOW` ``slow``."""
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


FAULT_REPORTS = {"fault_counts": "test_faults", "archive_counts": "archive_report"}


def _fault_counts(module: str) -> dict | None:
    report = getattr(sys.modules.get(module), "REPORT", None)
    return dict(report) if report and report["tried"] else None


def pytest_sessionfinish(session):
    """A pytest-xdist worker hands its fault-suite counts to the controller."""
    for key, module in FAULT_REPORTS.items():
        counts = _fault_counts(module)
        if counts and hasattr(session.config, "workeroutput"):
            session.config.workeroutput[key] = counts


_WORKER_FAULT_COUNTS: dict[str, list[dict]] = {key: [] for key in FAULT_REPORTS}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller collects each worker's fault-suite counts (pytest-xdist)."""
    for key in FAULT_REPORTS:
        counts = getattr(node, "workeroutput", {}).get(key)
        if counts:
            _WORKER_FAULT_COUNTS[key].append(counts)


def _summed(key: str) -> dict | None:
    parts = _WORKER_FAULT_COUNTS[key] + ([counts] if (counts := _fault_counts(FAULT_REPORTS[key])) else [])
    return {name: sum(part.get(name, 0) for part in parts) for name in parts[0]} if parts else None


def pytest_terminal_summary(terminalreporter):
    """The fault suites' counts (tests/test_faults.py, tests/archive_report.py), summed over xdist workers."""
    if report := _summed("fault_counts"):
        terminalreporter.write_line(
            "fault suite: {tried} cases tried, {clean} clean errors, {internal} tracebacks/internal errors, "
            "{data_lost} data lost, {recovered} faults recovered".format(**report))
    if report := _summed("archive_counts"):
        terminalreporter.write_line("archive fault suite: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                       for k, v in report.items()))
