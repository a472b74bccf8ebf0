"""Tile layers: the files every step reads and writes, and the contract between the steps.

From the bottom up:

* :mod:`.columns` – every column name, and how embeddings are stored; :mod:`.crs` – CRS and
  box helpers; :mod:`.runs` – the run records (how the layer was made), as data;
* :mod:`.formats` (what the formats share), :mod:`.gpkg`, :mod:`.parquet`, :mod:`.flatgeobuf` –
  each format's reading and atomic writing of tiles, run records and tables;
* :mod:`.files` – tile layer files (:class:`TileLayer`, merging, writing under a lock);
  :mod:`.manifest` and :mod:`.dataset` – partitioned datasets (a folder of GeoParquet parts and
  a manifest: the manifest and its checks; the parts, reading, writing back, merging);
* :mod:`.io` – reading and writing either kind through one set of functions; :mod:`.source` –
  :class:`TileSource`, one interface over a layer file and a dataset folder (:func:`open_source`).
"""
from .columns import read_embeddings
from .files import TileLayer, copy_layer
from .io import open_layer, read_runs, read_tiles, write_tiles
from .runs import LayerRuns, new_run
from .source import DatasetSource, FileSource, TilePart, TileSource, open_source

__all__ = ["DatasetSource", "FileSource", "LayerRuns", "TileLayer", "TilePart", "TileSource", "copy_layer",
           "new_run", "open_layer", "open_source", "read_embeddings", "read_runs", "read_tiles", "write_tiles"]
