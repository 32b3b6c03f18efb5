"""What the console shows (rcl_dist.console): quiet by default at each source, everything with -v."""

from __future__ import annotations

import os

import pytest

from rcl_dist import console


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # set (not deleted) through monkeypatch, so that teardown removes whatever main() wrote there:
    # a verbose flag left behind made later tests' Ray workers print every line twice
    monkeypatch.setenv(console.VERBOSE_ENV, "0")


def test_ray_processes_get_the_quiet_settings_unless_verbose(monkeypatch):
    assert console.ray_env(local=True) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert console.ray_env(local=False) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # a cluster keeps its watcher
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose() and console.ray_env(local=True) == {console.VERBOSE_ENV: "1"}


@pytest.mark.parametrize("argv", [["-v", "config"], ["config", "-v"], ["config", "--verbose", "train.steps=3"]])
def test_verbose_flag_anywhere_on_the_command_line(argv, capsys):
    from rcl_dist.cli import main

    assert not console.verbose()
    assert main(argv) == 0
    assert os.environ.get(console.VERBOSE_ENV) == "1"


def test_ui_hint_names_a_server_or_the_local_command():
    assert console.ui_hint("http://127.0.0.1:5000") == "open the UI at http://127.0.0.1:5000"
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in console.ui_hint("sqlite:////x/mlflow.db")
