"""The layer engine: calibration data, statistics observers, the layer loop, data-parallel reduction."""
