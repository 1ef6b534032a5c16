"""Model backends. Each turns pixels into a cacheable embedding and decodes text prompts on it."""
