"""Training: the recipe schema, the stage pipeline and engine, the KD methods, resumable state."""
