"""cpu backend (filled in at integration)."""
