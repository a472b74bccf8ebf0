"""Build-time tools of the plugin (not shipped in the plugin zip)."""
