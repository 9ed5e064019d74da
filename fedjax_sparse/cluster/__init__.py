"""Jittable, fixed-shape clustering: DBSCAN on distances, k-means, 1-D 2-means."""

from fedjax_sparse.cluster.dbscan import core_points, dbscan
from fedjax_sparse.cluster.hdbscan import hdbscan
from fedjax_sparse.cluster.kmeans import kmeans, two_means_1d

__all__ = ["core_points", "dbscan", "hdbscan", "kmeans", "two_means_1d"]
