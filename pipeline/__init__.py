"""Batch stages on Ray Data and Ray tasks: one module per stage, each with a typed config."""
