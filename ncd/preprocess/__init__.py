"""Preprocessing: MEBin binarisation and anomaly-centred crops of every image into region rows."""
