"""Small helpers for building frames without third-party packet libraries."""
