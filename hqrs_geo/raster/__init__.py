"""Rasters: where scenes come from, opening and describing them, the 8-bit stretch, lengths."""
