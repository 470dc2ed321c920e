"""`python -m pipeline.landmarks`: generate a preset of the built-in collection."""

from pipeline.landmarks.cli import main

if __name__ == "__main__":
    main()
