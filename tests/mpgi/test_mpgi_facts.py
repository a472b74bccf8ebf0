"""MpGI facts and rules: facts measured on real scenes against independent computations, rules as text."""
from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import EXAMPLE_SCENE, NAIP_SCENE, SHARED_SCENES, geographic_scene, shared_data, write_raster
from pyproj import Geod, Transformer
from rasterio.windows import Window
from shapely.geometry import LineString, Point, Polygon, box

from hqrs_geo import TileConfig, tile_rasters
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.mpgi.facts import (
    REGIONS,
    TileFacts,
    VectorFacts,
    VectorSource,
    compute_facts,
    parse_vector_spec,
    rgb_cover_masks,
)
from hqrs_geo.mpgi.rules import DEFAULT_RULES, fact_sentences, facts_block, merge_rules

SWELLENDAM = SHARED_SCENES / "swellendam_3420B_epsg4326.tif"
OSM = SHARED_SCENES / "swellendam_osm.gpkg"
NAIP = NAIP_SCENE  # a 256 px crop of ../shared's NAIP scene: R, G, B, NIR, 5 m
UTM_34S = "EPSG:32734"  # Swellendam, 20.5° E: the metric CRS the facts must use there
REL = 1e-6


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def swellendam():
    """The 3420B scene tiled at 256 px, and its facts with buildings and roads (GPL data: only in ../shared)."""
    shared_data("scenes/swellendam_3420B_epsg4326.tif", "scenes/swellendam_osm.gpkg")
    tiles, _ = tile_rasters(SWELLENDAM, TileConfig(tile_size=256))
    sources = [parse_vector_spec(f"{OSM}:buildings:building"), parse_vector_spec(f"{OSM}:roads:highway")]
    return tiles, compute_facts(tiles, sources)


@pytest.fixture(scope="module")
def naip():
    """The NAIP RGBN scene tiled at 128 px, and its facts."""
    tiles, _ = tile_rasters(NAIP, TileConfig(tile_size=128))
    return tiles, compute_facts(tiles, ndvi_threshold=0.3, ndwi_threshold=0.0)


@pytest.fixture(scope="module", params=["urban_river_epsg4326", "swellendam_3420B"])
def geographic(request):
    """A geographic (EPSG:4326) R, G, B + alpha scene tiled at 256 px, its tiles and facts: the
    example scene warped to EPSG:4326, and (with ../shared) the Swellendam 3420B aerial."""
    if request.param == "swellendam_3420B":
        return (SWELLENDAM, *request.getfixturevalue("swellendam"))
    path = geographic_scene()
    tiles, _ = tile_rasters(path, TileConfig(tile_size=256))
    return path, tiles, compute_facts(tiles)


def _tile_frame(tiles, i: int, crs: str) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(geometry=tiles.geometry.iloc[[i]].to_crs(crs).reset_index(drop=True), crs=crs)


def _tiles_with(tiles, layer: gpd.GeoDataFrame, n: int) -> list[int]:
    """Up to ``n`` tile rows whose footprint meets a feature of ``layer`` (same CRS)."""
    hits = [i for i, geom in enumerate(tiles.geometry) if layer.intersects(geom).any()]
    return hits[:: max(1, len(hits) // n)][:n]


# --------------------------------------------------------------------------- vector facts on real data

def test_building_facts_match_geopandas_overlay(swellendam):
    tiles, facts = swellendam
    buildings = gpd.read_file(OSM, layer="buildings")
    rows = _tiles_with(tiles, buildings.to_crs(tiles.crs), 6)
    assert len(rows) >= 3
    buildings = buildings.to_crs(UTM_34S)
    for i in rows:
        tile = _tile_frame(tiles, i, UTM_34S)
        inside = gpd.overlay(buildings[["building", "geometry"]], tile, how="intersection", keep_geom_type=True)
        inside = inside[inside.area > 0]
        got = facts[tiles.tile_id.iloc[i]].vectors[0]
        assert (got.label, got.kind) == ("buildings", "polygon")
        assert got.count == len(inside)
        expected = inside.union_all().area / tile.area.iloc[0] if len(inside) else 0.0
        assert got.area_fraction == pytest.approx(expected, rel=REL, abs=1e-12)
        if len(inside):
            by_class = inside.groupby(inside["building"].fillna("unknown")).apply(lambda g: g.area.sum())
            by_class = by_class / by_class.sum()
            assert dict(got.classes) == pytest.approx(by_class.to_dict(), rel=REL)
            assert [s for _, s in got.classes] == sorted((s for _, s in got.classes), reverse=True)
            assert sum(got.regions.values()) == pytest.approx(1.0)
            assert got.main_region == max(got.regions, key=got.regions.get)


def test_road_facts_match_geopandas_clip(swellendam):
    tiles, facts = swellendam
    roads = gpd.read_file(OSM, layer="roads")
    rows = _tiles_with(tiles, roads.to_crs(tiles.crs), 6)
    assert len(rows) >= 3
    roads = roads.to_crs(UTM_34S)
    for i in rows:
        tile = _tile_frame(tiles, i, UTM_34S)
        clipped = gpd.clip(roads[["highway", "geometry"]], tile.geometry.iloc[0])
        clipped = clipped[clipped.length > 0]
        got = facts[tiles.tile_id.iloc[i]].vectors[1]
        assert (got.label, got.kind) == ("roads", "line")
        assert got.count == len(clipped)
        assert got.length_m == pytest.approx(clipped.length.sum(), rel=REL)
        assert got.length_per_km2 == pytest.approx(clipped.length.sum() / (tile.area.iloc[0] / 1e6), rel=REL)
        by_class = clipped.length.groupby(clipped["highway"].fillna("unknown")).sum()
        assert dict(got.classes) == pytest.approx((by_class / by_class.sum()).to_dict(), rel=REL)
        assert sum(got.regions.values()) == pytest.approx(1.0)


def test_tiles_without_features_say_so(swellendam):
    tiles, facts = swellendam
    empty = [f.vectors[0] for f in facts.values() if f.vectors[0].count == 0]
    assert empty, "the scene only partly overlaps the buildings layer"
    assert all(v.area_fraction == 0.0 and v.main_region is None and v.classes == [] for v in empty)
    assert all(sum(v.regions.values()) == 0.0 for v in empty)


# --------------------------------------------------------------------------- regions on a synthetic tile

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One 90 m x 90 m tile in UTM 33N (1 m pixels) and a GeoPackage of polygons, lines and points on
    it (made once: the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("synthetic")
    x0, y1 = 500000.0, 4000000.0
    raster = write_raster(tmp_path / "scene.tif", np.full((3, 90, 90), 100, np.uint8),
                          transform=Affine(1, 0, x0, 0, -1, y1))
    tiles, _ = tile_rasters(raster, TileConfig(tile_size=90))
    gpkg = tmp_path / "features.gpkg"
    crs = "EPSG:32633"
    ponds = gpd.GeoDataFrame(  # one square in the north-west ninth, two overlapping squares in the south
        {"kind": ["pond", "pool", "pool"]},
        geometry=[box(x0 + 5, y1 - 20, x0 + 20, y1 - 5), box(x0 + 32, y1 - 88, x0 + 52, y1 - 68),
                  box(x0 + 40, y1 - 88, x0 + 58, y1 - 68)], crs=crs)
    ponds.iloc[:1].to_file(gpkg, layer="nw_pond")
    ponds.to_file(gpkg, layer="ponds")
    paths = gpd.GeoDataFrame(  # west to east through the middle row, then out past the tile
        {"kind": ["footway"]}, geometry=[LineString([(x0 - 30, y1 - 45), (x0 + 120, y1 - 45)])], crs=crs)
    paths.to_file(gpkg, layer="paths")
    trees = gpd.GeoDataFrame(
        {"kind": ["oak", "oak", None, "elm"]},
        geometry=[Point(x0 + 80, y1 - 80), Point(x0 + 70, y1 - 88), Point(x0 + 45, y1 - 10),
                  Point(x0 + 500, y1 - 10)], crs=crs)
    trees.to_file(gpkg, layer="trees")
    bowtie = Polygon([(x0 + 60, y1 - 5), (x0 + 80, y1 - 25), (x0 + 80, y1 - 5), (x0 + 60, y1 - 25)])
    gpd.GeoDataFrame(geometry=[bowtie], crs=crs).to_file(gpkg, layer="bowtie")  # invalid: self-intersecting
    return tiles, gpkg


def test_regions_and_main_region(synthetic):
    tiles, gpkg = synthetic
    sources = [parse_vector_spec(f"{gpkg}:{name}") for name in ("nw_pond", "ponds", "paths")]
    sources.append(parse_vector_spec(f"{gpkg}:trees:kind"))
    (facts,) = compute_facts(tiles, sources).values()
    nw_pond, ponds, paths, trees = facts.vectors

    assert nw_pond.count == 1 and nw_pond.main_region == "north-west"
    assert nw_pond.regions["north-west"] == pytest.approx(1.0)
    assert nw_pond.area_fraction == pytest.approx(15 * 15 / 90**2)

    assert ponds.count == 3
    assert ponds.area_fraction == pytest.approx((225 + 520) / 90**2)  # the overlap counted once
    assert ponds.main_region == "south"
    assert ponds.regions["south"] == pytest.approx(520 / 745)
    assert ponds.regions["north-west"] == pytest.approx(225 / 745)

    assert paths.kind == "line" and paths.count == 1 and paths.length_m == pytest.approx(90.0)
    assert [paths.regions[r] for r in ("west", "centre", "east")] == pytest.approx([1 / 3] * 3)

    assert trees.kind == "point" and trees.count == 3 and trees.main_region == "south-east"
    assert trees.regions["south-east"] == pytest.approx(2 / 3) and trees.regions["north"] == pytest.approx(1 / 3)
    assert trees.classes == [("oak", pytest.approx(2 / 3)), ("unknown", pytest.approx(1 / 3))]

    for v in facts.vectors:
        assert list(v.regions) == list(REGIONS)
        assert sum(v.regions.values()) == pytest.approx(1.0)


def test_invalid_polygons_are_made_valid(synthetic):
    tiles, gpkg = synthetic
    (facts,) = compute_facts(tiles, [parse_vector_spec(f"{gpkg}:bowtie")]).values()
    bowtie = facts.vectors[0]
    assert bowtie.count == 1 and bowtie.area_fraction == pytest.approx(200 / 90**2)  # two 100 m² triangles
    assert bowtie.main_region == "north-east"


def test_layers_are_read_once_with_a_bbox_and_progress_is_reported(synthetic, monkeypatch):
    import pyogrio

    tiles, gpkg = synthetic
    calls = []
    real = pyogrio.read_dataframe

    def counting(*args, **kwargs):
        calls.append(kwargs.get("bbox"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyogrio, "read_dataframe", counting)

    class Recorder:
        def __init__(self):
            self.stages, self.done = {}, {}

        def start(self, stage, total, *args, **kwargs):
            self.stages[stage], self.done[stage], self.current = total, 0, stage

        def advance(self, n=1):
            self.done[self.current] += n

    progress = Recorder()
    compute_facts(tiles, [VectorSource(str(gpkg), "ponds"), VectorSource(str(gpkg), "trees")], progress=progress)
    assert len(calls) == 2 and all(bbox is not None for bbox in calls)
    assert progress.stages == {"rasters": 1, "vectors": 2} and progress.done == progress.stages


# --------------------------------------------------------------------------- spectral, size, place, date

def _normalised_difference(a, b):
    a, b = a.astype(float), b.astype(float)
    return np.where(a + b != 0, (a - b) / np.where(a + b != 0, a + b, 1), 0.0)


def test_vegetation_and_water_fractions_match_numpy(naip):
    tiles, facts = naip
    with rasterio.open(NAIP) as src:
        for row in tiles.itertuples():
            red, green, _, nir = src.read(window=Window(row.x_off, row.y_off, row.width, row.height))
            valid = (red != src.nodata) & (green != src.nodata) & (nir != src.nodata)
            ndvi, ndwi = _normalised_difference(nir, red), _normalised_difference(green, nir)
            got = facts[row.tile_id]
            assert got.vegetation_fraction == pytest.approx(np.sum(valid & (ndvi > 0.3)) / valid.sum(), rel=1e-12)
            assert got.water_fraction == pytest.approx(np.sum(valid & (ndwi > 0.0)) / valid.sum(), rel=1e-12)
    assert any(0 < f.vegetation_fraction < 1 for f in facts.values())


def test_spectral_facts_need_a_nir_band(geographic, naip):
    path, tiles_rgb, rgb_facts = geographic  # RGB + alpha: no NIR band, so the shares are RGB estimates
    assert all(f.vegetation_source in ("rgb_exg", None) and f.water_source in ("rgb_water", None)
               for f in rgb_facts.values())
    assert any(f.vegetation_source == "rgb_exg" for f in rgb_facts.values())
    bare = compute_facts(tiles_rgb.iloc[:3], rgb_cover=False)
    assert all(f.vegetation_fraction is None and f.water_fraction is None and f.vegetation_source is None
               for f in bare.values())
    tiles, facts = naip
    assert {(f.vegetation_source, f.water_source) for f in facts.values()} == {("ndvi", "ndwi")}
    explicit = compute_facts(tiles.iloc[:2], nir_band=4)
    for tile_id, f in explicit.items():
        assert f.vegetation_fraction == facts[tile_id].vegetation_fraction
    with pytest.raises(OptionError, match="NIR band 9"):
        compute_facts(tiles.iloc[:1], nir_band=9)


# Boxes of the example scene (rows, columns at 0.25 m) drawn by eye on the image: open river water, a
# flat grey factory roof, a tree crown on the river island, the grey parking lot south of the river.
RIVER_BOX, ROOF_BOX, TREES_BOX, PARKING_BOX = (620, 740, 500, 580), (540, 660, 180, 300), (450, 490, 410, 450), \
    (780, 900, 560, 640)


def test_rgb_cover_rules_on_the_river_scene():
    """The RGB rules on a real RGB aerial with a river: the river is water, the tree crown
    vegetation, the roof and the parking lot neither."""
    with rasterio.open(EXAMPLE_SCENE) as src:
        rgb = src.read((1, 2, 3)).astype(float) / 255

    vegetation, water = rgb_cover_masks(rgb)
    assert not (vegetation & water).any()

    def share(mask, box):
        r0, r1, c0, c1 = box
        return mask[r0:r1, c0:c1].mean()

    assert share(water, RIVER_BOX) > 0.85 and share(vegetation, RIVER_BOX) < 0.1
    assert share(vegetation, TREES_BOX) > 0.9 and share(water, TREES_BOX) < 0.05
    for grey in (ROOF_BOX, PARKING_BOX):
        assert share(vegetation, grey) < 0.1 and share(water, grey) < 0.05


def test_rgb_facts_of_tiles_match_the_masks_and_say_their_source():
    """compute_facts on the RGB scene: each tile's shares are the masks' shares of its window, recorded
    as RGB estimates; the rule sentences say so; a tile on the river has water, the factory none."""
    from hqrs_geo.mpgi.rules import rule_sentences

    tiles, _ = tile_rasters(EXAMPLE_SCENE, TileConfig(tile_size=250))
    facts = compute_facts(tiles)
    with rasterio.open(EXAMPLE_SCENE) as src:
        rgb = src.read((1, 2, 3)).astype(float) / 255
    for row in tiles.itertuples():
        window = rgb[:, row.y_off:row.y_off + row.height, row.x_off:row.x_off + row.width]
        vegetation, water = rgb_cover_masks(window)
        got = facts[row.tile_id]
        assert (got.vegetation_source, got.water_source) == ("rgb_exg", "rgb_water")
        assert got.vegetation_fraction == pytest.approx(vegetation.mean(), abs=1e-12)
        assert got.water_fraction == pytest.approx(water.mean(), abs=1e-12)
    river_tile = tiles.tile_id[(tiles.x_off <= 540) & (tiles.x_off + tiles.width > 540)
                               & (tiles.y_off <= 680) & (tiles.y_off + tiles.height > 680)].iloc[0]
    factory_tile = tiles.tile_id[(tiles.x_off == 0) & (tiles.y_off == 500)].iloc[0]
    assert facts[river_tile].water_fraction > 0.3 and facts[factory_tile].water_fraction < 0.05
    assert max(f.water_fraction for f in facts.values()) > 0.6
    keys = dict(rule_sentences(facts[river_tile]))
    assert keys["water_rgb"].startswith("Open water covers about") and "estimated from RGB" in keys["water_rgb"]
    assert "vegetation" not in keys and "water" not in keys  # the NDVI / NDWI wording is for NIR only
    with pytest.raises(OptionError, match="excess-green threshold"):
        compute_facts(tiles.iloc[:1], exg_threshold=3)


def test_rgb_vegetation_agrees_with_ndvi_on_land(naip):
    """An independent reference: on the NAIP crop (R, G, B, NIR) the RGB vegetation mask of the
    colour bands agrees with NDVI > 0.3 on the land pixels (NDWI <= 0) for most of them. (Water
    there is algae green: indistinguishable from fields in RGB, hence land only.)"""
    with rasterio.open(NAIP) as src:
        red, green, blue, nir = src.read().astype(float)
    vegetation, _ = rgb_cover_masks(np.stack([red, green, blue]) / 255)
    land = _normalised_difference(green, nir) <= 0
    ndvi = _normalised_difference(nir, red) > 0.3
    assert land.mean() > 0.3
    assert (vegetation == ndvi)[land].mean() > 0.75


def test_size_gsd_and_centre_on_naip(naip):
    tiles, facts = naip
    to_wgs84 = Transformer.from_crs("EPSG:26914", "EPSG:4326", always_xy=True)
    with rasterio.open(NAIP) as src:
        for row in tiles.itertuples():
            f = facts[row.tile_id]
            assert f.width_m == pytest.approx(128 * 5.0) and f.height_m == pytest.approx(128 * 5.0)
            assert f.gsd_m == pytest.approx(5.0)
            x, y = src.transform * (row.x_off + row.width / 2, row.y_off + row.height / 2)
            lon, lat = to_wgs84.transform(x, y)
            assert (f.centre_lat, f.centre_lon) == pytest.approx((lat, lon), abs=1e-7)


def test_size_and_gsd_on_a_geographic_scene(geographic):
    path, tiles, facts = geographic
    geod = Geod(ellps="WGS84")
    with rasterio.open(path) as src:
        t = src.transform
        for row in tiles.iloc[::7].itertuples():
            f = facts[row.tile_id]
            lon, lat = t * (row.x_off + row.width / 2, row.y_off + row.height / 2)
            _, _, width = geod.inv(lon - t.a * row.width / 2, lat, lon + t.a * row.width / 2, lat)
            _, _, height = geod.inv(lon, lat - t.e * row.height / 2, lon, lat + t.e * row.height / 2)
            assert f.width_m == pytest.approx(width, rel=2e-3) and f.height_m == pytest.approx(height, rel=2e-3)
            assert f.gsd_m == pytest.approx(np.sqrt(width * height) / 256, rel=5e-3)
            assert (f.centre_lat, f.centre_lon) == pytest.approx((lat, lon), abs=1e-6)
            assert f.acquired is None


def test_acquisition_date_from_tags(tmp_path):
    data = np.full((3, 32, 32), 50, np.uint8)
    plain = write_raster(tmp_path / "plain.tif", data)
    tagged = write_raster(tmp_path / "tagged.tif", data)
    imagery = write_raster(tmp_path / "imagery.tif", data)
    with rasterio.open(tagged, "r+") as dst:
        dst.update_tags(TIFFTAG_DATETIME="2021:06:15 10:20:30")
    with rasterio.open(imagery, "r+") as dst:
        dst.update_tags(ns="IMAGERY", ACQUISITIONDATETIME="2019-11-02T08:15:00Z")
    tiles, _ = tile_rasters([plain, tagged, imagery], TileConfig(tile_size=32))
    by_source = {row.source: row.tile_id for row in tiles.itertuples()}
    facts = compute_facts(tiles)
    assert facts[by_source[str(tagged)]].acquired == "2021-06-15"
    assert facts[by_source[str(imagery)]].acquired == "2019-11-02"
    assert facts[by_source[str(plain)]].acquired is None


# --------------------------------------------------------------------------- vector specs

def test_parse_vector_spec(synthetic):
    _, gpkg = synthetic
    source = parse_vector_spec(f"{gpkg}:trees:kind")
    assert (source.path, source.layer, source.label, source.class_field) == (str(gpkg), "trees", "trees", "kind")
    assert parse_vector_spec(f"{gpkg}:nw_pond").label == "nw pond"


@pytest.mark.parametrize("suffix, words", [
    (":nope", ["no layer 'nope'", "ponds"]),
    (":trees:species", ["no field 'species'", "kind"]),
    ("", ["5 layers", ":LAYER"]),
])
def test_parse_vector_spec_errors_are_one_line(synthetic, suffix, words):
    _, gpkg = synthetic
    with pytest.raises(InputError) as err:
        parse_vector_spec(f"{gpkg}{suffix}")
    message = str(err.value)
    assert "\n" not in message and str(gpkg) in message
    assert all(w in message for w in words)


def test_parse_vector_spec_missing_file(tmp_path):
    missing = tmp_path / "nowhere.gpkg"
    with pytest.raises(InputError) as err:
        parse_vector_spec(f"{missing}:roads:highway")
    assert "\n" not in str(err.value) and str(missing) in str(err.value) and "not found" in str(err.value)


# --------------------------------------------------------------------------- rules

def _hand_facts(**changes) -> TileFacts:
    facts = TileFacts(
        tile_id="t1", width_m=640.4, height_m=639.6, gsd_m=2.5, centre_lat=-34.02134, centre_lon=20.51489,
        acquired="2021-06-15", vegetation_fraction=0.426, water_fraction=None,
        vectors=[
            VectorFacts("buildings", "polygon", count=1234567, area_fraction=0.1049,
                        classes=[("house", 0.62), ("shed", 0.3), ("church", 0.08)], main_region="north-west"),
            VectorFacts("roads", "line", count=3, length_m=1520.4, length_per_km2=3710.0, main_region="centre"),
            VectorFacts("schools", "polygon", count=1, area_fraction=0.02, main_region="east"),
            VectorFacts("restaurants", "point", count=0),
        ],
    )
    for name, value in changes.items():
        setattr(facts, name, value)
    return facts


def test_fact_sentences_default_rules():
    assert fact_sentences(_hand_facts()) == [
        "The image covers about 640 m by 640 m of ground at 2.5 m per pixel.",
        "Its centre lies at 34.0213° S, 20.5149° E.",
        "It was acquired on 2021-06-15.",
        "About 43% of the area is vegetated (NDVI > 0.3).",
        "There are 1234567 buildings covering about 10% of the image, mostly in the north-west part.",
        "Most buildings are house (62%) and shed (30%).",
        "Roads run for about 1520 m through the image, mostly in the centre.",
        "There is 1 school covering about 2% of the image, mostly in the east part.",
        "There are no restaurants in the image.",
    ]


def test_fact_kinds_split_metadata_from_content():
    from hqrs_geo.mpgi.integrate import sentence_issue
    from hqrs_geo.mpgi.rules import RULE_KINDS, rule_sentences

    assert set(RULE_KINDS) == set(DEFAULT_RULES) and set(RULE_KINDS.values()) == {"metadata", "content"}
    facts = _hand_facts()
    everything = fact_sentences(facts)
    metadata, content = fact_sentences(facts, kind="metadata"), fact_sentences(facts, kind="content")
    assert metadata == everything[:3] and content == everything[3:]
    assert [key for key, _ in rule_sentences(facts)][:3] == ["size", "location", "date"]
    # the caption checks agree with the kinds: every default metadata sentence is caught, no content one
    assert all(sentence_issue(s, everything) in ("gives coordinates", "states the ground size", "gives a date")
               for s in metadata)
    assert [sentence_issue(s, everything) for s in content] == [""] * len(content)
    with pytest.raises(ValueError, match="unknown fact kind"):
        fact_sentences(facts, kind="other")


def test_rules_can_be_overridden_and_disabled():
    rules = {"size": "", "location": "", "absent": "", "date": None,
             "polygons": "{count} {label} ({pct:.1f}%).", "lines": "{label}: {length_km:.1f} km."}
    lines = facts_block(_hand_facts(acquired=None, vegetation_fraction=None), rules).splitlines()
    assert lines == [
        "1234567 buildings (10.5%).", "Most buildings are house (62%) and shed (30%).",
        "Roads: 1.5 km.", "1 schools (2.0%).",
    ]
    assert set(merge_rules()) == set(DEFAULT_RULES)
    with pytest.raises(OptionError, match="unknown rule 'colour'"):
        fact_sentences(_hand_facts(), {"colour": "x"})
    with pytest.raises(OptionError, match=r"rule 'lines' uses unknown field \{pct\}"):
        fact_sentences(_hand_facts(), {"lines": "{pct}"})


def test_facts_round_trip_through_json(synthetic):
    tiles, gpkg = synthetic
    facts = compute_facts(tiles, [parse_vector_spec(f"{gpkg}:trees:kind")])
    for f in facts.values():
        d = json.loads(json.dumps(f.as_dict()))
        assert TileFacts.from_dict(d) == f
