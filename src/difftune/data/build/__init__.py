"""Building a dataset: prepare (filter and lay out), condition (conditioning images), caption."""
