"""``python -m pipeline.train``."""

from model.cli import run_cli
from pipeline.train import TrainConf, run

if __name__ == "__main__":
    run_cli(run, TrainConf)
