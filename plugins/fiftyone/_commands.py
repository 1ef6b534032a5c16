"""`promptseg fiftyone ...` sub-commands (registered through the promptseg_add_commands hook)."""
