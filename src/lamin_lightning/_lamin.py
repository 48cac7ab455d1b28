"""LaminDB layer: placeholder until the LaminDB issue lands."""
