"""Compression workflow (placeholder, filled below)."""
