"""Examples of hqrs_geo: the demo job, map rendering, model training scripts."""
