"""Sample-quality measurements for ddim_plus models (each in its own module, imported on demand)."""
