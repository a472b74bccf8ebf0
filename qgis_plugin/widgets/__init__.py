"""The plugin's GUI: ``dock`` (HQRS search), ``settings_dialog`` (HQRS settings) and
``engine_setup`` (finding or installing the engine)."""
