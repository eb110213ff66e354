"""Datasets and storage: the I/O layer (local and s3://), catalogs, the synthetic set, splits, region tables."""
