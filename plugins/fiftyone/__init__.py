"""promptseg adapter for fiftyone."""
