"""Models: loading, target-module matching, quantisation."""
