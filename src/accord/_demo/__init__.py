"""The narrated demo behind `accord demo`: one module per step, each running its own cluster."""
