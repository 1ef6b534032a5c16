"""promptseg adapter for labelstudio."""
