"""In-process adapters: the embedded defaults, and the reference for every other engine."""
