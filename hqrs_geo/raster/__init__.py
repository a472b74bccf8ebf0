"""Rasters: where scenes come from, opening and describing them, the 8-bit stretch, lengths, tile
grids (windows of a scene) and how a scene's pixels are read (:class:`~hqrs_geo.raster.reading.SceneReading`)."""
