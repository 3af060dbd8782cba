"""Shared helpers for tests (real DICOM writers)."""
