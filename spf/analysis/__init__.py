"""Insights I–III (low rank, conflict, overlap): a research tool over the method's gradient factors."""
