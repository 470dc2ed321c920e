"""``python -m pipeline.ingest``."""

from model.cli import run_cli
from pipeline.ingest import IngestConf, run

if __name__ == "__main__":
    run_cli(run, IngestConf)
