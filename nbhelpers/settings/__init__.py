"""Settings: the error base, KEY=VALUE parsing, run profiles, training presets, the grid, devices, result tables."""
