"""cuda backend (filled in at integration)."""
