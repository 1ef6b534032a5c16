"""promptseg adapter for napari."""
