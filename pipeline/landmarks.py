"""The landmarks stage: generate a preset of the built-in collection.

    python -m pipeline.landmarks --conf demo --root data

The generator itself is ``model.datasets.landmarks`` (its command line: ``cli.main``).
"""

from model.datasets.landmarks.cli import main

if __name__ == "__main__":
    main()
