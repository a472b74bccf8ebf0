"""Tile layers: the files every step reads and writes, and the contract between the steps.

* :mod:`.columns` – every column name, and how embeddings are stored;
* :mod:`.runs` – the run records (how the layer was made), read through one reader;
* :mod:`.io` – reading and (atomically) writing GeoPackage, GeoParquet and FlatGeobuf layers;
* :mod:`.dataset` – partitioned datasets (a folder of GeoParquet parts and a manifest), read and
  updated through the same functions, merged into one layer.
"""
from .columns import read_embeddings
from .io import TileLayer, open_layer, read_tiles, write_tiles
from .runs import LayerRuns, new_run, read_runs

__all__ = ["LayerRuns", "TileLayer", "new_run", "open_layer", "read_embeddings", "read_runs", "read_tiles",
           "write_tiles"]
