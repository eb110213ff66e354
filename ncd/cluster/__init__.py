"""Clustering. Import from the submodules, e.g. ``from ncd.cluster.kmeans import kmeans``.

Nothing is re-exported here: a package attribute named ``kmeans`` would shadow the
``ncd.cluster.kmeans`` module.
"""
