"""The pre-training job as a script: ``python pipelines/pretrain.py --config FILE [key=value ...]``.

Today this runs the single-process trainer (rcl_dist.train.local); the Ray Train version, submitted
with ``ray submit cluster/config.yaml pipelines/pretrain.py``, replaces it in the distributed
pre-training issue. The command line is that of ``rcl-dist pretrain``.
"""

import sys

from rcl_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
