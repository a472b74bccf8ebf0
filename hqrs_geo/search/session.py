"""A search session over one tile layer: layer, embedding matrix and model loaded once,
then any number of text / example / zero-shot queries (the QGIS dock keeps one alive through
``hqrs-geo serve-search``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError
from ..layer.columns import embedding_keys
from ..layer.io import open_layer, write_layer, write_tiles
from ..layer.runs import EmbeddingSource, new_run
from ..models.encode import class_vectors, image_vectors, query_vectors, text_vectors
from ..models.prompts import ZERO_SHOT_TEMPLATES
from ..models.zeroshot import ZeroShot, check_labels, zero_shot_scale
from .exact import ExactSearch
from .index import VectorIndex
from .queries import combine, load_source_model
from .spatial import SpatialFilter


@dataclass
class Block:
    """One stored embedding matrix of a session: the layer's, or one part of a dataset."""

    part: str | None
    ids: np.ndarray
    matrix: np.ndarray
    exact: ExactSearch  # over matrix

    def id_at(self, row: int) -> str:
        """The tile id of a row."""
        value = self.ids[row]
        return value.decode() if isinstance(value, bytes) else str(value)


class BaseSession:
    """What every search session shares: the model of the embeddings (loaded on first use) and
    the queries built with it. Subclasses provide ``vector_search``, ``tile_vectors`` and
    ``classify`` over their storage (one layer, or a partitioned dataset)."""

    layer: str
    source: EmbeddingSource
    index: Any  # the Searcher over the embeddings: a VectorIndex, or a DatasetIndex over the parts
    checkpoint: str | None = None
    device: str = "cpu"
    trust_checkpoint: bool = False
    _model: Any = None

    @property
    def model(self) -> Any:
        """The embeddings' own model (loaded once)."""
        if self._model is None:
            self._model = load_source_model(self.source, self.checkpoint, self.device, self.trust_checkpoint)
        return self._model

    def vector_search(self, query: np.ndarray, k: int = 20, spatial: SpatialFilter | None = None,
                      exclude: Sequence[str] = ()) -> Any:
        """Top ``k`` tiles for a normalised query vector (GeoDataFrame with ``score`` and ``rank``)."""
        raise NotImplementedError

    def tile_vectors(self, tile_ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings of tiles (one-line error for unknown ids)."""
        raise NotImplementedError

    def part_vectors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of part ``name`` of the layer (see
        :meth:`hqrs_geo.layer.source.TileSource.parts`) and the row of each one's tile in the
        part's tiles as :meth:`hqrs_geo.layer.source.TilePart.read` returns them."""
        raise NotImplementedError

    def score_all(self, query: np.ndarray, spatial: SpatialFilter | None = None,
                  exclude: Sequence[str] = ()) -> dict[str, float]:
        """``{tile_id: score}`` of every tile with an embedding that passes the filters."""
        raise NotImplementedError

    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 3,
                 write: bool = False) -> Any:
        """Zero-shot ``label``, ``label_score``, ``label_top`` for every tile (written with ``write``)."""
        raise NotImplementedError

    def blocks(self) -> list[Block]:
        """The embedding matrices, in search order (a layer file has one, a dataset one per part)."""
        raise NotImplementedError

    def block_masks(self, spatial: SpatialFilter | None) -> list[np.ndarray | None | bool]:
        """Per block of :meth:`blocks`: the rows ``spatial`` allows (None: all), or False when it
        leaves out the whole block."""
        raise NotImplementedError

    def block_rows(self, hits: Sequence[tuple[float, int, int]]) -> Any:
        """The result rows of ``hits`` ``(score, block, row in the block)``, best first, as a
        GeoDataFrame with ``score`` and ``rank`` (and ``part`` for a dataset)."""
        raise NotImplementedError

    def record_run(self, run: dict) -> None:
        """Add a run record to the layer without changing its tiles."""
        raise NotImplementedError

    def check_columns(self, what: str) -> None:
        """Refuse (one-line :class:`OptionError`) when per-tile columns (of ``what``, e.g.
        "detection") cannot be written into the layer itself; nothing when they can."""
        raise NotImplementedError

    @property
    def crs(self) -> Any:
        """The CRS of the result footprints."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What is served, for the first line of ``serve-search``: ``kind`` (and ``parts``)."""
        raise NotImplementedError

    def changed(self) -> bool:
        """True when the layer was rewritten since the session read it."""
        raise NotImplementedError

    def build_index(self, kind: str = "auto", **params: Any) -> dict:
        """Build (or update) the nearest-neighbour index of the embeddings (``hqrs-geo index``)
        and return its report."""
        return self.index.build_index(kind, **params)

    def text_query(self, texts: Sequence[str], template: bool = True) -> np.ndarray:
        """Normalised query vector for one or more texts (combined by their mean); each text is
        worded as zero-shot classes are (the prompt ensemble, and the synonyms of a class name:
        :func:`~hqrs_geo.models.encode.query_vectors`); ``template=False`` embeds the bare text."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise OptionError("the query is empty; give some text", option="query")
        if template:
            vectors = query_vectors(self.model, texts, self.ensemble())
        else:
            vectors = text_vectors(self.model, texts, ["{}"])
        return combine(vectors)

    def search_text(self, texts: Any, k: int = 20, spatial: SpatialFilter | None = None,
                    template: bool = True) -> Any:
        """Tiles ranked by similarity to the text(s)."""
        return self.vector_search(self.text_query(texts, template), k, spatial)

    def similar_query(self, positive_ids: Sequence[str] = (), negative_ids: Sequence[str] = (),
                      positive_images: Sequence[str] = (), negative_images: Sequence[str] = (),
                      negative_weight: float = 0.5) -> np.ndarray:
        """Query vector from examples: mean of positives minus weighted mean of negatives."""
        parts = [self.tile_vectors(positive_ids)] if positive_ids else []
        if positive_images:
            parts.append(image_vectors(self.model, positive_images))
        negs = [self.tile_vectors(negative_ids)] if negative_ids else []
        if negative_images:
            negs.append(image_vectors(self.model, negative_images))
        if not parts:
            raise OptionError("no positive example; give a tile id or an image file", option="tile")
        return combine(np.concatenate(parts), np.concatenate(negs) if negs else None, negative_weight)

    def search_similar(self, positive_ids: Sequence[str] = (), negative_ids: Sequence[str] = (),
                       positive_images: Sequence[str] = (), negative_images: Sequence[str] = (),
                       negative_weight: float = 0.5, k: int = 20, spatial: SpatialFilter | None = None,
                       include_examples: bool = False) -> Any:
        """Tiles like the positive examples and unlike the negative ones (tile ids and/or image files)."""
        query = self.similar_query(positive_ids, negative_ids, positive_images, negative_images, negative_weight)
        exclude = () if include_examples else tuple(positive_ids) + tuple(negative_ids)
        return self.vector_search(query, k, spatial, exclude)

    def ensemble(self) -> list[str]:
        """The prompt templates of this layer's model: the template its embeddings were made
        with, then :data:`~hqrs_geo.models.prompts.ZERO_SHOT_TEMPLATES`."""
        return list(dict.fromkeys([self.source.template, *ZERO_SHOT_TEMPLATES]))

    def label_vectors(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """One normalised vector per label from the prompt ensemble and the class synonyms."""
        return class_vectors(self.model, labels, templates or self.ensemble())

    def zero_shot(self, labels: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 3
                  ) -> ZeroShot:
        """The checked labels and their class vectors, ready to label rows of vectors."""
        labels = check_labels(labels, templates, top_k)
        return ZeroShot(labels, self.label_vectors(labels, templates), zero_shot_scale(self.model), int(top_k))


class SearchSession(BaseSession):
    """Answers queries on ``layer``; the model is loaded on the first query that needs it."""

    def __init__(self, layer: str, model: str | None = None, checkpoint: str | None = None,
                 device: str = "cpu", use_ann: bool | None = None, trust_checkpoint: bool = False):
        self.layer = str(layer)
        opened = open_layer(self.layer)
        self.opened = opened
        self.frame = opened.frame
        self.source = opened.runs.embedding_source(embedding_keys(self.frame), model)
        self.trust_checkpoint = trust_checkpoint
        self.index = VectorIndex.open(self.layer, self.source.key, frame=self.frame)
        self.rows = self.frame.reset_index(drop=True).set_index("tile_id").index.get_indexer(self.index.ids)
        self.checkpoint, self.device = checkpoint, device
        self.use_ann = bool(use_ann) and self.index.load_ann()
        self._model = None

    def mask(self, spatial: SpatialFilter | None, exclude: Sequence[str] = ()) -> np.ndarray | None:
        """Rows of the index allowed by the spatial filter and not excluded (None: all)."""
        if (spatial is None or not spatial.active) and not exclude:
            return None
        keep = spatial.mask(self.frame) if spatial is not None and spatial.active else np.ones(len(self.frame), bool)
        index_mask = keep[self.rows]
        if exclude:
            index_mask &= ~np.isin(self.index.ids, list(exclude))
        return index_mask

    def _results(self, scores: np.ndarray, rows: np.ndarray):
        frame = self.frame.iloc[self.rows[rows]].copy()
        frame.insert(1, "score", scores.astype(float))
        frame.insert(2, "rank", np.arange(1, len(frame) + 1))
        return frame.reset_index(drop=True)

    def vector_search(self, query: np.ndarray, k: int = 20, spatial: SpatialFilter | None = None,
                      exclude: Sequence[str] = ()):
        """Top ``k`` tiles for a normalised query vector, as a GeoDataFrame with ``score``/``rank``."""
        if k < 1:
            raise OptionError(f"{k!r} results asked; ask for at least one", option="k")
        scores, rows = self.index.search(query, k=k, mask=self.mask(spatial, exclude), use_ann=self.use_ann)
        return self._results(scores[0], rows[0])

    def part_vectors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of the layer file (its one part, whatever ``name``: see
        :meth:`hqrs_geo.layer.source.TileSource.parts`) and the row of each one's tile in the
        file's tiles as read (ordered by ``tile_id``)."""
        return self.index.matrix, self.rows

    def blocks(self) -> list[Block]:
        """The layer's embedding matrix."""
        return [Block(None, self.index.ids, self.index.matrix, self.index.exact)]

    def block_masks(self, spatial: SpatialFilter | None) -> list[np.ndarray | None | bool]:
        """The rows of the one block that ``spatial`` allows."""
        return [self.mask(spatial)]

    def block_rows(self, hits: Sequence[tuple[float, int, int]]) -> Any:
        """The result rows of ``hits`` (all in the one block)."""
        return self._results(np.asarray([h[0] for h in hits], dtype=np.float64),
                             np.asarray([h[2] for h in hits], dtype=np.int64))

    def record_run(self, run: dict) -> None:
        """Add a run record to the layer file (its tiles rewritten as they are)."""
        self.opened = write_layer(self.layer, self.opened.frame, run, replace_all=True, known=self.opened)

    def check_columns(self, what: str) -> None:
        """A layer file takes per-tile columns."""

    @property
    def crs(self) -> Any:
        """The layer's CRS."""
        return self.frame.crs

    def describe(self) -> dict:
        """A layer file."""
        return {"kind": "layer"}

    def changed(self) -> bool:
        """True when the file changed since it was read."""
        return not self.opened.unchanged()

    def tile_vectors(self, tile_ids: Sequence[str]) -> np.ndarray:
        """Stored embeddings of tiles (one-line error for unknown ids)."""
        lookup = {tid: i for i, tid in enumerate(self.index.ids)}
        missing = [t for t in tile_ids if t not in lookup]
        if missing:
            raise OptionError(f"unknown tile id {str(missing[0])[:80]!r} (or it has no embedding) in {self.layer}; "
                              "give the id of a tile with an embedding", option="tile")
        return np.asarray(self.index.matrix[[lookup[t] for t in tile_ids]], dtype=np.float32)

    def score_all(self, query: np.ndarray, spatial: SpatialFilter | None = None,
                  exclude: Sequence[str] = ()) -> dict[str, float]:
        """``{tile_id: score}`` of every tile with an embedding that passes the filters."""
        all_scores = self.index.scores(query, self.mask(spatial, exclude))
        return {tid: float(s) for tid, s in zip(self.index.ids, all_scores) if s == s}

    def classify(self, labels: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 3,
                 write: bool = False) -> Any:
        """Zero-shot classes for every tile with an embedding: ``label``, ``label_score`` and
        ``label_top`` (``"a:0.61;b:0.22;…"``) columns on a copy of the layer; with ``write`` the
        columns are also written to the layer (with a run record)."""
        zero_shot = self.zero_shot(labels, templates, top_k)
        frame = zero_shot.columns(self.frame.copy(), self.rows, self.index.matrix)
        if write:
            frame = write_tiles(self.layer, frame, new_run("classify", "tiles", zero_shot.params(templates,
                                                                                                 self.source.model)),
                                replace_sources=list(frame["source"].unique()), known=self.opened)
        return frame
