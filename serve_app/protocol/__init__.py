"""Wire and internal request types. Imports neither Ray nor torch."""
