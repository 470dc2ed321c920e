"""Data sets: readers of the revisited layout and photo folders, and the built-in landmark
collection."""
