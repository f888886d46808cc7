"""Real data that ships inside packages, for demos and benchmarks that run offline."""

from .movie_reviews import load_movie_reviews, movie_reviews_file


__all__ = ["load_movie_reviews", "movie_reviews_file"]
