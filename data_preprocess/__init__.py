"""Preprocessing scripts that turn search-QA data sets into verl RLHFDataset parquet (run with ``python -m``)."""
