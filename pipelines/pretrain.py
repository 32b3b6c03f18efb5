"""The pre-training job for a cluster: ``ray submit cluster/config.yaml pipelines/pretrain.py -- --config FILE``.

Same command line as ``rcl-dist pretrain`` (Ray Train workers, DALI input, MLflow tracking): on the
head node of a running cluster it connects to that cluster; elsewhere it starts a local Ray.
"""

import sys

from rcl_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
