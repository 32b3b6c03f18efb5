"""The driver's progress bar (rcl_dist.train.progress): which mode a console gets, what the bar shows,
and a real pre-training run on a local Ray whose rank 0 feeds the driver's bar (and prints no lines)."""

from __future__ import annotations

import io

import pytest

from rcl_dist import console
from rcl_dist.train.progress import PROGRESS_ENV, driver_progress, format_fields, post_progress, progress_mode

ray = pytest.importorskip("ray")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)


def test_mode_follows_the_terminal_the_setting_and_verbose(monkeypatch):
    assert progress_mode(_Tty()) == "bar"
    assert progress_mode(io.StringIO()) == "lines"  # a log file or CI: one line per log step
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    assert progress_mode(_Tty()) == "lines"
    monkeypatch.setenv(PROGRESS_ENV, "bar")
    assert progress_mode(io.StringIO()) == "bar"
    monkeypatch.setenv(PROGRESS_ENV, "auto")
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # -v shows the workers' own lines
    assert progress_mode(_Tty()) == "lines"
    monkeypatch.setenv(PROGRESS_ENV, "fancy")
    with pytest.raises(ValueError, match=f"{PROGRESS_ENV} must be one of"):
        progress_mode(_Tty())


def test_fields_in_a_fixed_order_and_unknown_keys_left_out():
    text = format_fields({"samples_per_s": 88.14, "contrast": 20.93, "loss": 5.416, "data_wait_fraction": 0.013, "epoch": 3.0})
    assert text == "loss 5.416  contrast 20.93  samples/s 88.1  data wait 1%"


def test_lines_mode_gives_no_board_and_posting_to_none_is_a_no_op():
    with driver_progress("x", 3, mode="lines") as board:
        assert board is None
        post_progress(board, 1, 3, {"loss": 1.0})


def test_bar_redraws_from_posts_of_another_process_and_ends_with_a_summary(local_ray):
    out, summary = io.StringIO(), []

    @ray.remote(num_cpus=0)
    def rank0(board):
        for step in (1, 2, 3):
            post_progress(board, step, 3, {"loss": 1.0 / step, "samples_per_s": 10.0 * step, "not_shown": 7.0})
        return True

    with driver_progress("pretrain t", 3, mode="bar", file=out, log=summary.append, poll_s=0.05) as board:
        assert board is not None
        assert ray.get(rank0.remote(board))
    text = out.getvalue()
    assert "pretrain t" in text and "3/3" in text and "loss 0.3333" in text and "samples/s 30.0" in text
    assert "not_shown" not in text
    assert len(summary) == 1 and summary[0].startswith("pretrain t: done at step 3/3 in ") and "loss 0.3333" in summary[0]


def test_bar_says_stopped_when_the_job_fails(local_ray):
    out, summary = io.StringIO(), []
    with pytest.raises(RuntimeError, match="boom"):
        with driver_progress("fine-tune t", 5, mode="bar", file=out, log=summary.append):
            raise RuntimeError("boom")
    assert summary[0].startswith("fine-tune t: stopped at step 0/5")


@pytest.mark.slow
def test_pretrain_on_ray_feeds_the_driver_bar_and_workers_print_no_lines(local_ray, tmp_path, monkeypatch, capfd):
    from rcl_dist.config import load_config
    from rcl_dist.train.launch import run_pretrain

    monkeypatch.setenv(PROGRESS_ENV, "bar")
    lines: list[str] = []
    cfg = load_config(None, ["model.width=4", "model.depth=2", "data.crop=32", "data.tile=64", "data.threads=1",
                             "train.batch_size=8", "train.log_every=1", "loss.encoder=null", "train.steps=3",
                             "dist.workers=2", f"dist.storage_path={tmp_path / 'ray'}", "dist.run_name=bar"])  # fmt: skip
    result = run_pretrain(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log=lines.append)
    assert result.metrics["step"] == 3
    err = capfd.readouterr().err
    assert "pre-training bar" in err and "3/3" in err and "loss " in err  # the driver's bar
    assert "[rcl-dist] step" not in err  # no worker progress lines beside the bar
    assert any(line.startswith("pre-training bar: done at step 3/3") for line in lines)
