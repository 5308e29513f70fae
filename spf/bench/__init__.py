"""The defense benchmark: every method × threat scenario, resumable cells, a report regenerated from JSON."""
