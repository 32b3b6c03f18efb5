"""A check shared by the DALI tests: where a pipeline graph puts its outputs (no GPU needed)."""

from __future__ import annotations


def check_graph_devices(plan, spec) -> None:
    """Define the graph of ``plan``/``spec`` for the CPU and for a GPU and serialise it: the two pair
    outputs live on that device, the index on the CPU. A GPU pipeline can be defined and serialised
    without a GPU, not built."""
    from nvidia.dali import pipeline_def

    from rcl_dist.data import dali as D

    for gpu in (False, True):

        @pipeline_def
        def define():
            outs = D._graph(plan, spec, gpu, True)
            assert [o.device for o in outs] == ["gpu" if gpu else "cpu"] * 2 + ["cpu"]
            return outs

        define(batch_size=2, num_threads=1, device_id=None).serialize()
