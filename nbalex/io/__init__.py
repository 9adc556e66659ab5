"""io backend (filled in at integration)."""
