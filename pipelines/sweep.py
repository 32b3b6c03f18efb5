"""The sweep job for a cluster: ``ray submit cluster/config.yaml pipelines/sweep.py -- tune_spaces/gpu-paper.yaml``.

Same command line as ``rcl-dist sweep`` (Ray Tune trials, each a Ray Train pre-training with proxy
validation, MLflow parent and nested runs): on the head node of a running cluster it connects to that
cluster; elsewhere it starts a local Ray.
"""

import sys

from rcl_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
