"""`python -m pipeline.datasets.landmarks`: generate a preset of the built-in collection."""

from pipeline.datasets.landmarks.cli import main

if __name__ == "__main__":
    main()
