"""Catalog inputs: lists, URLs read with HTTP range requests, /vsi paths, STAC Items,
ItemCollections and Catalogs (pystac), with asset choice and bbox/datetime filters."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rasterio.windows import Window
from scale_helpers import EXAMPLE_SCENE, RangeServer, stac_item, wgs84_bounds, write_crop

from hqrs_geo import InputError, OptionError, TileConfig, TileDataset, read_tiles
from hqrs_geo.api import tile
from hqrs_geo.layer.columns import SOURCE_URL, STAC_ITEM
from hqrs_geo.raster.catalog import SourceFilter, gdal_path, resolve_sources, source_url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    server = RangeServer(folder)
    write_crop(EXAMPLE_SCENE, folder / "a.tif", Window(0, 0, 512, 384), cog=True)
    write_crop(EXAMPLE_SCENE, folder / "b.tif", Window(400, 400, 384, 384), cog=True)
    yield server, folder
    server.close()


def test_paths_urls_lists_and_keys(tmp_path, served):
    server, _ = served
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    one = write_crop(EXAMPLE_SCENE, tmp_path / "x" / "scene.tif", Window(0, 0, 256, 256), cog=False)
    two = write_crop(EXAMPLE_SCENE, tmp_path / "y" / "scene.tif", Window(256, 0, 256, 256), cog=False)
    listing = tmp_path / "sources.txt"
    listing.write_text(f"# my archive\nx/scene.tif\n\n{two}\n{server.url('a.tif')}\ns3://bucket/key/c.tif\n")
    entries = resolve_sources([str(listing), str(one)])  # the duplicate of x/scene.tif is dropped
    assert [e.path for e in entries] == [str(one), str(two), f"/vsicurl/{server.url('a.tif')}",
                                         "/vsis3/bucket/key/c.tif"]
    assert [e.url for e in entries][2:] == [server.url("a.tif"), "s3://bucket/key/c.tif"]
    keys = [e.key for e in entries]
    assert len(set(keys)) == 4 and keys[0].startswith("scene-") and keys[2] == "a" and keys[3] == "c"
    assert gdal_path("gs://b/k.tif") == "/vsigs/b/k.tif" and source_url("/vsis3/b/k.tif") == "s3://b/k.tif"
    with pytest.raises(InputError, match="empty"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        resolve_sources([str(tmp_path / "empty.txt")])


def test_cog_over_http_reads_like_the_local_file(tmp_path, served):
    server, folder = served
    server.requests.clear()
    config = TileConfig(tile_size=128)
    remote = tile(server.url("a.tif"), tmp_path / "remote.gpkg", config)
    local = tile(folder / "a.tif", tmp_path / "local.gpkg", config)
    assert len(remote) == len(local) == 12
    assert list(remote[SOURCE_URL].unique()) == [server.url("a.tif")] and remote[STAC_ITEM].isna().all()
    assert remote.source.iloc[0] == f"/vsicurl/{server.url('a.tif')}" and SOURCE_URL not in local.columns
    assert remote.geometry.geom_equals_exact(local.geometry, 1e-9).all()
    a, b = TileDataset.from_layer(tmp_path / "remote.gpkg"), TileDataset.from_layer(tmp_path / "local.gpkg")
    for i in range(len(a)):
        assert np.array_equal(a[i][1], b[i][1])
    ranges = [r for _, r in server.requests if r]
    assert ranges and all(r.startswith("bytes=") for r in ranges)  # read with range requests


def test_unreachable_url_is_one_line():
    from scale_helpers import free_port

    from hqrs_geo.tiling.plan import prepare_scenes

    with pytest.raises(InputError) as err:
        prepare_scenes([f"http://127.0.0.1:{free_port()}/missing.tif"], TileConfig())
    assert "\n" not in str(err.value) and "missing.tif" in str(err.value)


def _collection(tmp_path, server):
    features = [stac_item("item-a", server.url("a.tif"), (4.98, 51.83, 4.99, 51.84), "2021-03-01T10:00:00Z",
                          extra_assets={"nir": server.url("b.tif")}),
                stac_item("item-b", server.url("b.tif"), (5.5, 52.0, 5.6, 52.1), "2022-07-01T10:00:00Z")]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path, features


def test_stac_item_collection_asset_and_filters(tmp_path, served):
    server, _ = served
    path, _ = _collection(tmp_path, server)
    entries = resolve_sources([str(path)])
    assert [(e.item, e.key, e.url) for e in entries] == [("item-a", "item-a", server.url("a.tif")),
                                                        ("item-b", "item-b", server.url("b.tif"))]
    assert [e.item for e in resolve_sources([str(path)], SourceFilter(bbox=(4.9, 51.8, 5.0, 51.9)))] == ["item-a"]
    assert [e.item for e in resolve_sources([str(path)], SourceFilter(datetime="2022-01-01/.."))] == ["item-b"]
    assert [e.item for e in resolve_sources([str(path)], SourceFilter(datetime="2021-03-01"))] == ["item-a"]
    picked = resolve_sources([str(path)], SourceFilter(asset="nir", bbox=(4.9, 51.8, 5.0, 51.9)))
    assert picked[0].url == server.url("b.tif")
    with pytest.raises(InputError, match=r"item-b: has no asset 'nir' \(it has: visual\); choose one with asset"):
        resolve_sources([str(path)], SourceFilter(asset="nir"))
    with pytest.raises(OptionError, match="invalid datetime"):
        resolve_sources([str(path)], SourceFilter(datetime="last week"))
    with pytest.raises(OptionError, match="no STAC input"):
        resolve_sources([str(EXAMPLE_SCENE)], SourceFilter(bbox=(0, 0, 1, 1)))
    layer = tile(path, tmp_path / "t.parquet", TileConfig(tile_size=128, crs="EPSG:4326"))
    assert set(layer[STAC_ITEM]) == {"item-a", "item-b"}
    assert set(read_tiles(tmp_path / "t.parquet")[SOURCE_URL]) == {server.url("a.tif"), server.url("b.tif")}


def test_stac_catalog_local_and_by_url(tmp_path, served):
    import pystac

    server, folder = served
    catalog = pystac.Catalog(id="archive", description="two scenes")
    child = pystac.Catalog(id="year-2021", description="a sub-catalog")
    catalog.add_child(child)
    for name in ("a", "b"):
        item = pystac.Item.from_dict(stac_item(f"scene-{name}", f"./{name}.tif", wgs84_bounds(folder / f"{name}.tif"),
                                               "2021-05-01T00:00:00Z"))
        child.add_item(item)
    catalog.normalize_hrefs(str(folder / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    # relative asset hrefs ("./a.tif") are resolved against each item's own location
    for path in (folder / "stac").rglob("scene-*.json"):
        data = json.loads(path.read_text())
        data["assets"]["visual"]["href"] = f"../../../{data['id'][-1]}.tif"
        path.write_text(json.dumps(data))
    local = resolve_sources([str(folder / "stac" / "catalog.json")])
    assert [(e.item, e.path) for e in local] == [("scene-a", str(folder / "a.tif")), ("scene-b", str(folder / "b.tif"))]
    remote = resolve_sources([server.url("stac/catalog.json")])
    assert [e.path for e in remote] == [f"/vsicurl/{server.url('a.tif')}", f"/vsicurl/{server.url('b.tif')}"]
    with pytest.raises(InputError, match="none.json: does not exist on the server .HTTP 404."):
        resolve_sources([server.url("stac/none.json")])
