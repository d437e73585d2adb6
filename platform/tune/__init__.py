"""A Ray Tune search over an experiment: the search driver, the space and budget, and all its checks."""
