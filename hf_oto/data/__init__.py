"""Real data that ships inside packages, for demos and benchmarks that run offline, and its preprocessing."""

from .images import FASHION_MNIST_DIR, ImagePreprocessor, load_idx_dataset, read_idx
from .movie_reviews import load_movie_reviews, movie_reviews_file


__all__ = [
    "FASHION_MNIST_DIR",
    "ImagePreprocessor",
    "load_idx_dataset",
    "load_movie_reviews",
    "movie_reviews_file",
    "read_idx",
]
