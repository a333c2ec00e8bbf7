"""Data: read rows, validate conversations, render chat templates, encode exactly masked examples."""
