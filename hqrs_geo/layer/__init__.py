"""Tile layers: the files every step reads and writes, and the contract between the steps.

* :mod:`.columns` – every column name, and how embeddings are stored;
* :mod:`.runs` – the run records (how the layer was made), read through one reader;
* :mod:`.io` – reading and (atomically) writing GeoPackage, GeoParquet and FlatGeobuf layers;
* :mod:`.dataset` – partitioned datasets (a folder of GeoParquet parts and a manifest), read and
  updated through the same functions, merged into one layer;
* :mod:`.source` – :class:`TileSource`, one interface over a layer file and a dataset folder
  (:func:`open_source`), and :func:`copy_layer`.
"""
from .columns import read_embeddings
from .io import TileLayer, open_layer, read_tiles, write_tiles
from .runs import LayerRuns, new_run, read_runs
from .source import DatasetSource, FileSource, TilePart, TileSource, copy_layer, open_source

__all__ = ["DatasetSource", "FileSource", "LayerRuns", "TileLayer", "TilePart", "TileSource", "copy_layer",
           "new_run", "open_layer", "open_source", "read_embeddings", "read_runs", "read_tiles", "write_tiles"]
