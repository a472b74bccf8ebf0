"""Search over a partitioned dataset (a folder of GeoParquet parts and a manifest) at archive scale.

Nothing is loaded whole. Each part's embeddings of one model are decoded once into a cache in
``DATASET/_search/`` (memory-mapped float16 ``.npy`` with the tile ids and each tile's footprint
bounds beside it, rebuilt when the part's sha256 in the manifest changes), so opening a dataset
of millions of tiles costs milliseconds and its vectors are shared through the page cache.

Queries go part by part: spatial filters prune whole parts first (their bounds in the manifest),
then rows by their footprint bounds (cheap, from the cache), and only the remaining rows' real
footprints are tested (read from the part): the same rows as filtering every tile after the
fact. Exact search runs the exact kernels on each part and merges the parts' top k; with the
compressed index (``hqrs-geo index DATASET --kind ivfpq``, built over all parts in
``DATASET/_search/emb_<key>.ivfpq`` and updated part by part as the dataset grows), candidates
come from the index and are re-scored exactly. Result rows are read from their parts, with the
part's name, so hits can be exported as chips or shown in QGIS.

:class:`DatasetSession` answers the same queries as :class:`~hqrs_geo.search.session.SearchSession`
(text, example tiles, zero-shot classes); :func:`~hqrs_geo.search.sessions.open_session` picks the
right one for a tile source.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from ..atomic import atomic_path, write_text
from ..errors import InputError, OptionError
from ..layer.columns import TILE_ID, embedding_column, embedding_columns
from ..layer.dataset import (
    DatasetRuns,
    Manifest,
    open_manifest,
    part_crs,
    same_crs,
    verified_part,
    write_dataset_layer,
)
from ..layer.runs import new_run
from .base import Result, Searcher
from .choose import choose_kind
from .exact import ExactSearch, max_row_norm
from .ivfpq import CompressedIndex, CompressedSearch, EmbeddingPart
from .session import BaseSession, Block
from .spatial import SpatialFilter, to_layer_crs

SEARCH_FOLDER = "_search"
CACHE_VERSION = 2  # 2: the part's CRS in the cache's metadata


@dataclass
class PartVectors:
    """One part's vectors of one model: matrix, tile ids and footprint bounds (memory-mapped)."""

    name: str
    path: Path
    sha256: str
    matrix: np.ndarray  # (n, D) float16 / float32
    ids: np.ndarray  # (n,) bytes
    bounds: np.ndarray  # (n, 4) float64 minx, miny, maxx, maxy
    rows: np.ndarray  # (n,) row of each vector in the part file
    part_bounds: list | None = None
    crs: str | None = None  # the CRS of the part's footprints (and of ``bounds``)

    def __post_init__(self) -> None:
        self.exact = ExactSearch(self.matrix, max_row_norm(self.matrix) if len(self.matrix) else 0.0)

    def as_embedding_part(self) -> EmbeddingPart:
        """The part as an input of the compressed index."""
        return EmbeddingPart(self.name, self.sha256, self.matrix)


def _cache_files(folder: Path, part: str, key: str) -> dict[str, Path]:
    base = folder / SEARCH_FOLDER / f"{part}.emb_{key}"
    return {"matrix": Path(f"{base}.npy"), "ids": Path(f"{base}.ids.npy"), "bounds": Path(f"{base}.bounds.npy"),
            "rows": Path(f"{base}.rows.npy"), "meta": Path(f"{base}.json")}


def _decode_part(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(matrix, ids, bounds, rows) of the tiles of a part that have an embedding of ``key``
    (``bounds`` in the part's own CRS)."""
    column = embedding_column(key)
    try:
        table = pq.read_table(path, columns=[column, TILE_ID, "geometry"])
    except Exception as exc:  # pyarrow raises many types for damaged files and missing columns
        raise InputError(f"{path}: cannot read the embeddings {column} of this part ({str(exc).splitlines()[0]}); "
                         "embed the dataset with this model first") from None
    values = table.column(column).combine_chunks()
    if not hasattr(values.type, "list_size"):
        raise InputError(f"{path}: the embeddings {column} of this part are not vectors of one size; embed the "
                         "dataset again («overwrite»)")
    present = np.asarray(pc.is_valid(values).to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.flatnonzero(present)
    dim = values.type.list_size
    flat = values.filter(pc.is_valid(values)).flatten().to_numpy(zero_copy_only=False)
    matrix = np.asarray(flat).reshape(len(rows), dim)
    ids = np.asarray(table.column(TILE_ID).to_numpy(zero_copy_only=False)[present]).astype("S")
    geometry = shapely.from_wkb(np.asarray(table.column("geometry").to_numpy(zero_copy_only=False))[present])
    bounds = shapely.bounds(geometry).astype(np.float64)
    return matrix, ids, bounds, rows.astype(np.int64)


def part_vectors(manifest: Manifest, name: str, key: str) -> PartVectors:
    """The cached vectors of part ``name`` (decoded and cached on first use or when it changed;
    the part is checked against its manifest entry before it is decoded)."""
    folder, info = manifest.folder, manifest.parts[name]
    files = _cache_files(folder, name, key)
    sha256 = str(info.get("sha256", ""))
    try:
        meta = json.loads(files["meta"].read_text())
        if meta.get("version") == CACHE_VERSION and meta.get("sha256") == sha256:
            loaded = {k: np.load(files[k], mmap_mode="r", allow_pickle=False) for k in ("matrix", "ids", "bounds",
                                                                                       "rows")}
            if len({len(loaded[k]) for k in loaded}) == 1:
                return PartVectors(name, folder / name, sha256, loaded["matrix"], loaded["ids"], loaded["bounds"],
                                   loaded["rows"], info.get("bounds"), meta.get("crs"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    path = verified_part(manifest, name)
    matrix, ids, bounds, rows = _decode_part(path, key)
    if not np.isfinite(np.asarray(matrix, dtype=np.float32)).all():
        raise InputError(f"{path}: embeddings {key} contain NaN or infinite values; embed the dataset again")
    crs = part_crs(path)
    try:
        files["matrix"].parent.mkdir(exist_ok=True)
        for part, array in (("matrix", matrix), ("ids", ids), ("bounds", bounds), ("rows", rows)):
            with atomic_path(files[part], verify=None) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        write_text(files["meta"], json.dumps({"version": CACHE_VERSION, "sha256": sha256, "n": int(len(ids)),
                                              "crs": crs}))
    except OSError:  # a read-only dataset: search from memory
        return PartVectors(name, path, sha256, matrix, ids, bounds, rows, info.get("bounds"), crs)
    return part_vectors(manifest, name, key)


def _area_bounds(spatial: SpatialFilter, crs: Any) -> tuple[float, float, float, float] | None:
    """Conservative bounds (in ``crs``) of the area a filter can keep; None when it does not limit space."""
    boxes = []
    if spatial.bbox is not None:
        boxes.append(to_layer_crs(shapely.box(*spatial.bbox), spatial.bbox_crs, crs).bounds)
    if spatial.near is not None and spatial.distance is not None and crs is not None:
        x, y = float(spatial.near[0]), float(spatial.near[1])
        lon, lat = Transformer.from_crs(CRS.from_user_input(spatial.near_crs), "EPSG:4326",
                                        always_xy=True).transform(x, y)
        local = f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m"
        circle = shapely.Point(0, 0).buffer(spatial.distance * 1.01 + 1.0, 64)
        boxes.append(to_layer_crs(circle, local, crs).bounds)
    if spatial.within is not None:
        path, _, layer = spatial.within.partition("|layername=")
        try:
            polygons = gpd.read_file(path, layer=layer or None)
        except Exception as exc:  # pyogrio raises several types for foreign files
            raise InputError(f"{path}: cannot read polygons ({str(exc).splitlines()[0]}); give a vector layer") \
                from None
        if polygons.crs is not None and crs is not None:
            polygons = polygons.to_crs(crs)
        if not polygons.empty:
            boxes.append(tuple(float(v) for v in polygons.total_bounds))
    if not boxes:
        return None
    return (max(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), min(b[3] for b in boxes))


def _overlap(bounds: np.ndarray, area: Sequence[float]) -> np.ndarray:
    return ~((bounds[:, 0] > area[2]) | (bounds[:, 2] < area[0]) | (bounds[:, 1] > area[3]) | (bounds[:, 3] < area[1]))


class DatasetIndex(Searcher):
    """The vectors of one model over a dataset's parts, searched part by part: a
    :class:`~hqrs_geo.search.base.Searcher` whose rows are the parts' vectors one after the other
    (:meth:`locate` turns them back into part and row)."""

    NO_INDEX = ("no approximate index is loaded for this dataset: build one with 'hqrs-geo index DATASET', "
                "or search exactly")

    def __init__(self, folder: Path, key: str, manifest: Manifest, parts: list[PartVectors]):
        self.folder, self.key, self.manifest, self.parts = folder, key, manifest, parts
        self.by_name = {p.name: p for p in parts}
        self.starts = np.cumsum([0] + [len(p.ids) for p in parts], dtype=np.int64)  # first row of each part, then n
        self._ann: CompressedSearch | None = None

    @classmethod
    def open(cls, folder: str | Path, key: str) -> DatasetIndex:
        """The vectors of model ``key`` in every part of the dataset at ``folder``."""
        folder = Path(folder)
        manifest = open_manifest(folder)
        parts = [part_vectors(manifest, name, key) for name, info in sorted(manifest.parts.items())
                 if info.get("tiles", 0) > 0]
        parts = [p for p in parts if len(p.ids)]
        dims = Counter(int(p.matrix.shape[1]) for p in parts)
        if len(dims) > 1:  # a part embedded by another model: refused by name, never a wrong score
            usual = dims.most_common(1)[0][0]
            odd = next(p for p in parts if p.matrix.shape[1] != usual)
            raise InputError(f"{odd.path}: its embeddings emb_{key} have {odd.matrix.shape[1]} values, the other "
                             f"parts of dataset {folder} {usual}; embed the dataset again with one model "
                             "(«overwrite»), or remove this part")
        return cls(folder, key, manifest, parts)

    @property
    def n(self) -> int:
        """Tiles with an embedding."""
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.parts[0].matrix.shape[1]) if self.parts else 0

    def locate(self, rows: np.ndarray) -> list[tuple[str, int]]:
        """``(part name, index in the part's vectors)`` of rows of this index."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        return [(self.parts[int(p)].name, int(r - self.starts[p])) for p, r in zip(which, rows)]

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[tuple[float, str, int]]:
        """One query's results as ``(score, part name, index in the part's vectors)``, best first."""
        return [(float(s), name, r) for s, (name, r) in zip(scores, self.locate(rows))]

    # ------------------------------------------------------------------ filters
    def masks(self, spatial: SpatialFilter | None = None, exclude: Sequence[str] = ()) -> dict[str, np.ndarray | None]:
        """Per part, the rows allowed (None: all of them); parts left out entirely are absent."""
        active = spatial is not None and spatial.active
        if active and spatial is not None and spatial.bbox is not None and spatial.bbox_crs is None:
            spatial = replace(spatial, bbox_crs=self.manifest.crs)  # the box is in the dataset's CRS
        areas: dict[Any, tuple[float, float, float, float] | None] = {}
        wanted = np.asarray([e.encode() for e in exclude], dtype="S") if exclude else None
        out: dict[str, np.ndarray | None] = {}
        for part in self.parts:
            crs = part.crs or self.manifest.crs  # a part in another CRS is filtered in its own
            if active and spatial is not None and crs not in areas:
                areas[crs] = _area_bounds(spatial, crs)
            area = areas.get(crs)
            if area is not None and part.part_bounds is not None and not _overlap(np.asarray([part.part_bounds]),
                                                                                   area)[0]:
                continue
            mask = None
            if active and spatial is not None:
                mask = _overlap(part.bounds, area) if area is not None else np.ones(len(part.ids), bool)
                if mask.any():
                    rows = part.rows[mask]
                    table = pq.read_table(verified_part(self.manifest, part.name), columns=["geometry"]).take(rows)
                    geoms = gpd.GeoDataFrame(geometry=shapely.from_wkb(
                        np.asarray(table.column("geometry").to_numpy(zero_copy_only=False))), crs=crs)
                    mask[np.flatnonzero(mask)] = spatial.mask(geoms)
                if not mask.any():
                    continue
            if wanted is not None:
                drop = np.isin(part.ids, wanted)
                if drop.any():
                    mask = ~drop if mask is None else mask & ~drop
            out[part.name] = mask
        return out

    def mask(self, spatial: SpatialFilter | None = None, exclude: Sequence[str] = ()) -> np.ndarray | None:
        """The rows allowed by :meth:`masks`, as one mask over this index's rows (None: all of them)."""
        masks = self.masks(spatial, exclude)
        if len(masks) == len(self.parts) and all(m is None for m in masks.values()):
            return None
        out = np.zeros(self.n, dtype=bool)
        for part, start, end in zip(self.parts, self.starts[:-1], self.starts[1:]):
            if part.name in masks:
                part_mask = masks[part.name]
                out[start:end] = True if part_mask is None else part_mask
        return out

    # ------------------------------------------------------------------ search
    def top(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> Result:
        """Exact search: each part's best ``k`` (parts the mask leaves out are not searched),
        merged; ties by part, then row."""
        found_scores, found_rows = [], []
        for part, start, end in zip(self.parts, self.starts[:-1], self.starts[1:]):
            part_mask = None if mask is None else mask[start:end]
            scores, rows = part.exact.search_many(q, k, part_mask)
            if rows.shape[1]:
                found_scores.append(scores)
                found_rows.append(rows + start)
        scores, rows = np.concatenate(found_scores, axis=1), np.concatenate(found_rows, axis=1)
        best = np.stack([np.lexsort((rows[i], -scores[i]))[:k] for i in range(len(q))])
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(rows, best, axis=1)

    def approximate(self) -> Searcher:
        """The dataset's compressed index, searched over these rows (one-line error when none is loaded)."""
        if self._ann is None:
            raise OptionError(self.NO_INDEX)
        return self._ann

    # ------------------------------------------------------------------ vectors of tiles
    def tile_vectors(self, tile_ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings of tiles by id (one-line error for unknown ids)."""
        wanted = [t.encode() for t in tile_ids]
        found: dict[bytes, np.ndarray] = {}
        for part in self.parts:
            hit = np.flatnonzero(np.isin(part.ids, np.asarray(wanted, dtype="S")))
            for i in hit:
                found[bytes(part.ids[i])] = np.asarray(part.matrix[i], dtype=np.float32)
        missing = [t for t, w in zip(tile_ids, wanted) if w not in found]
        if missing:
            raise OptionError(f"unknown tile id {missing[0]!r} (or it has no embedding) in {self.folder}")
        return np.stack([found[w] for w in wanted])

    # ------------------------------------------------------------------ the compressed index
    def index_folder(self) -> Path:
        """Where the dataset's compressed index lives."""
        return self.folder / SEARCH_FOLDER / f"emb_{self.key}.ivfpq"

    def load_ann(self) -> bool:
        """Load the compressed index when it covers exactly the current parts."""
        ann = CompressedIndex.open(self.index_folder())
        parts = [p.as_embedding_part() for p in self.parts]
        if ann is None or ann.stale_parts(parts):
            return False
        self._ann = CompressedSearch(ann, parts, self)
        return True

    def build_index(self, kind: str = "auto", **params: Any) -> dict:
        """Build or update the dataset's index (``auto``: exact while small, else ivfpq); returns
        a report with recall@10 against exact search on held-out queries."""
        if kind not in ("auto", "exact", "ivfpq"):
            raise OptionError(f"a dataset is indexed with auto, exact or ivfpq, not {kind!r}", option="kind")
        reason = f"{kind} asked for"
        if kind == "auto":
            kind, reason = choose_kind(self.n, self.dim)
            if kind == "ivf":
                kind, reason = "ivfpq", reason + "; datasets use the compressed index, which grows part by part"
        report: dict[str, Any] = {"kind": kind, "n": self.n, "dim": self.dim, "parts": len(self.parts),
                                  "reason": reason}
        if kind == "exact":
            return {**report, "recall_at_10": 1.0, **self._latency(use_ann=False)}
        start = time.perf_counter()
        existing = CompressedIndex.open(self.index_folder())
        parts = [p.as_embedding_part() for p in self.parts]
        if existing is not None and not params and existing.meta["dim"] == self.dim:
            report["update"] = existing.update(parts)
            compressed = existing
        else:
            compressed = CompressedIndex.build(parts, self.index_folder(), **params)
        self._ann = CompressedSearch(compressed, parts, self)
        report["build_seconds"] = round(time.perf_counter() - start, 2)
        measured: dict[str, float] = {}

        def recall_now() -> float:
            measured.update(self._latency(use_ann=True))
            return measured["recall_at_10"]

        compressed.calibrate(recall_now)
        report["path"] = str(self.index_folder())
        report.update(compressed.params)
        report["bytes_on_disk"] = sum(f.stat().st_size for f in self.index_folder().rglob("*")
                                      if f.is_file() and "shards" not in f.parts)
        return {**report, **measured}

    def _latency(self, use_ann: bool) -> dict:
        rng = np.random.default_rng(12345)
        queries = []
        for _ in range(min(100, self.n)):
            part = self.parts[int(rng.integers(len(self.parts)))]
            q = np.asarray(part.matrix[int(rng.integers(len(part.ids)))], dtype=np.float32)
            q = q + rng.standard_normal(q.shape).astype(np.float32) * np.float32(0.05 / math.sqrt(self.dim))
            queries.append(q / np.linalg.norm(q))
        q = np.stack(queries)
        truth = self.search(q, 10)[1]
        hits, times = 0, []
        for i in range(len(q)):
            begin = time.perf_counter()
            found = self.search(q[i], 10, use_ann=use_ann)[1][0]
            times.append(time.perf_counter() - begin)
            hits += len(np.intersect1d(found, truth[i]))
        return {"recall_at_10": round(hits / (10 * len(q)), 4),
                "query_p50_ms": round(float(np.median(times)) * 1000, 3)}


class DatasetSession(BaseSession):
    """Queries on a dataset folder: the API of :class:`~hqrs_geo.search.session.SearchSession`."""

    def __init__(self, layer: str, model: str | None = None, checkpoint: str | None = None, device: str = "cpu",
                 use_ann: bool | None = None, trust_checkpoint: bool = False):
        self.layer = str(layer)
        manifest = open_manifest(self.layer)
        self.source = DatasetRuns(manifest).embedding_source(self._keys(manifest), model)
        self.index = DatasetIndex.open(self.layer, self.source.key)
        self.checkpoint, self.device, self.trust_checkpoint = checkpoint, device, trust_checkpoint
        self.use_ann = bool(use_ann) and self.index.load_ann()
        self._model = None

    @classmethod
    def embedding_key(cls, layer: str, model: str | None = None) -> str:
        """The key of the embeddings of ``model`` in the dataset (the only one when None)."""
        manifest = open_manifest(layer)
        return DatasetRuns(manifest).embedding_source(cls._keys(manifest), model).key

    @staticmethod
    def _keys(manifest: Manifest) -> list[str]:
        for path in manifest.part_files():
            names = pq.read_schema(verified_part(manifest, path.name)).names
            return [c[len("emb_"):] for c in embedding_columns(names)]
        return []

    def _rows(self, hits: list[tuple[float, str, int]]) -> Any:
        """The result rows (tile columns and footprints, no embeddings) read from their parts."""
        crs = self.index.manifest.crs
        frames = []
        for name in dict.fromkeys(n for _, n, _ in hits):
            part = self.index.by_name[name]
            picks = [(rank, int(part.rows[r])) for rank, (_, n, r) in enumerate(hits) if n == name]
            path = verified_part(self.index.manifest, name)
            names = pq.read_schema(path).names
            vectors = set(embedding_columns(names))
            table = pq.read_table(path, columns=[c for c in names if c not in vectors])
            table = table.take([r for _, r in picks])
            frame = table.drop(["geometry"]).to_pandas()
            geometry = shapely.from_wkb(np.asarray(table.column("geometry").to_numpy(zero_copy_only=False)))
            own = part.crs or crs
            frame = gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometry, crs=own), crs=own)
            if crs is not None and own is not None and not same_crs(own, crs):
                frame = frame.to_crs(crs)  # a part in another CRS: footprints in the dataset's
            frame.insert(1, "part", name)
            frame["_rank"] = [rank for rank, _ in picks]
            frames.append(frame)
        if not frames:
            return gpd.GeoDataFrame({TILE_ID: [], "score": [], "rank": []}, geometry=gpd.GeoSeries([], crs=crs),
                                    crs=crs)
        frame = pd.concat(frames, ignore_index=True).sort_values("_rank").drop(columns="_rank")
        frame = gpd.GeoDataFrame(frame, geometry="geometry", crs=crs).reset_index(drop=True)
        frame.insert(1, "score", [h[0] for h in hits])
        frame.insert(2, "rank", np.arange(1, len(frame) + 1))
        return frame

    def vector_search(self, query: np.ndarray, k: int = 20, spatial: SpatialFilter | None = None,
                      exclude: Sequence[str] = ()) -> Any:
        """Top ``k`` tiles for a normalised query vector (GeoDataFrame with ``score``, ``rank``, ``part``)."""
        scores, rows = self.index.search(query, k, self.index.mask(spatial, exclude), use_ann=self.use_ann)
        return self._rows(self.index.hits(scores[0], rows[0]))

    def blocks(self) -> list[Block]:
        """One block per part, in search order."""
        return [Block(p.name, p.ids, p.matrix, p.exact) for p in self.index.parts]

    def block_masks(self, spatial: SpatialFilter | None) -> list[np.ndarray | None | bool]:
        """Per part, the rows ``spatial`` allows; False for the parts it leaves out (never read)."""
        found = self.index.masks(spatial)
        return [found[p.name] if p.name in found else False for p in self.index.parts]

    def block_rows(self, hits: Sequence[tuple[float, int, int]]) -> Any:
        """The result rows of ``hits``, read from their parts."""
        return self._rows([(s, self.index.parts[b].name, r) for s, b, r in hits])

    def record_run(self, run: dict) -> None:
        """Add a run record to the dataset's manifest."""
        manifest = open_manifest(self.layer)
        manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
        manifest.save()

    def check_columns(self, what: str) -> None:
        """A dataset takes no per-tile columns of results: they go to a layer of their own."""
        raise OptionError(f"{self.layer}: a dataset gets no {what} columns; write the {what}s to a layer with "
                          "-o OUT.gpkg", option="output")

    @property
    def crs(self) -> Any:
        """The dataset's CRS (result footprints are in it, whatever the part's)."""
        return self.index.manifest.crs

    def describe(self) -> dict:
        """A dataset, and how many parts it has."""
        return {"kind": "dataset", "parts": len(self.index.parts)}

    def changed(self) -> bool:
        """A dataset session reads its parts as it goes: it is never stale as a whole."""
        return False

    def part_vectors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of part ``name`` (memory-mapped) and the row of each one's tile in the
        part's tiles as read (ordered by ``tile_id``); none for a part without them."""
        vectors = self.index.by_name.get(name)
        if vectors is None:
            return np.zeros((0, self.index.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return vectors.matrix, np.asarray(vectors.rows)

    def tile_vectors(self, tile_ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings of tiles (one-line error for unknown ids)."""
        return self.index.tile_vectors(tile_ids)

    def score_all(self, query: np.ndarray, spatial: SpatialFilter | None = None,
                  exclude: Sequence[str] = ()) -> dict[str, float]:
        """Scores of every tile cannot be written back as one column of a dataset."""
        raise OptionError("score columns and score rasters are made per layer: merge the area of interest into a "
                          "GeoPackage first (hqrs-geo merge DATASET -o area.gpkg --bbox …)", option="score_column")

    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 3,
                 write: bool = False) -> Any:
        """Zero-shot ``label``/``label_score``/``label_top`` for every tile, part by part; with
        ``write`` each part is rewritten with the columns (and the manifest gets a run record).
        Returns the tiles of every part (without embeddings) with the label columns."""
        zero_shot = self.zero_shot(labels, templates, top_k)
        crs = self.index.manifest.crs
        frames = []
        for part in self.index.parts:
            tiles = gpd.read_parquet(verified_part(self.index.manifest, part.name))
            if crs is not None and tiles.crs is not None and not same_crs(tiles.crs, crs):
                tiles = tiles.to_crs(crs)  # a part in another CRS is written back in the dataset's
            frame = zero_shot.columns(tiles, part.rows, part.matrix)
            if write:
                write_dataset_layer(self.layer, frame, None, replace_sources=[])
            frames.append(frame.drop(columns=embedding_columns(list(frame.columns))))
        if write:
            self.record_run(new_run("classify", "tiles", zero_shot.params(templates, self.source.model)))
        if not frames:
            return gpd.GeoDataFrame({TILE_ID: []}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
        return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=crs)
