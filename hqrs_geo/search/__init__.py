"""Search over tile layers: text queries, similar tiles, zero-shot classes, spatial filters."""
