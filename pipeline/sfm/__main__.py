"""``python -m pipeline.sfm``."""

from model.cli import run_cli
from pipeline.sfm import SfmConf, run

if __name__ == "__main__":
    run_cli(run, SfmConf)
