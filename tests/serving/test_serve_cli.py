"""``zoo serve`` / ``python -m serving``: arguments, cheap import, and the errors reported before anything starts."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from serving import cli
from serving.config import MIB, ServeConfig


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_arguments_become_the_bento_arguments():
    cfg = cli.config_from_args(_parse("a", "b", "--backend", "torch", "--max-upload-mb", "2", "--max-batch-size", "4"))
    assert cfg.models == ["a", "b"] and cfg.backend == "torch" and cfg.max_upload_bytes == 2 * MIB
    assert cfg.max_batch_size == 4 and cfg.max_latency_ms == 10_000 and cfg.max_pixels == 4096 * 4096
    assert ServeConfig.model_validate(cfg.model_dump()) == cfg  # what the worker reads back
    assert ServeConfig(models="x, y").models == ["x", "y"]  # `bentoml serve --arg models=x,y`
    with pytest.raises(ValueError, match="max_batch_size"):
        cli.config_from_args(_parse("a", "--max-batch-size", "0"))
    with pytest.raises(ValueError):
        ServeConfig(models=["a"], unknown=1)
    with pytest.raises(SystemExit):
        _parse("a", "--backend", "tensorrt")
    assert cli.config_from_args(_parse("a", "--precision", "int8")).precision == "int8"
    assert cli.config_from_args(_parse("a")).precision == "fp32"
    with pytest.raises(ValueError, match="torch backend serves fp32 only"):
        cli.config_from_args(_parse("a", "--backend", "torch", "--precision", "int8"))


def test_cli_module_imports_cheaply():
    code = ("import sys, serving.cli; "
            "print(sorted(m for m in ('torch', 'bentoml', 'onnxruntime', 'zoo') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_errors_before_the_server_starts(capsys):
    """Each is one ``serving: error:`` line and status 2 (in-process: nothing is started for them)."""
    from serving.__main__ import main

    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    err = error("baseline-resnet18-breastmnistt")  # the store of this test is empty
    assert "serving: error: unknown zoo model 'baseline-resnet18-breastmnistt'" in err
    assert "baseline-resnet18-breastmnist" in err.split("Closest:")[1]
    assert "zoo build baseline-resnet18-breastmnist" in error("baseline-resnet18-breastmnist")
    assert "not built" in error("baseline-resnet18-breastmnist", "--backend", "torch")
    assert "max_latency_ms" in error("baseline-resnet18-breastmnist", "--max-latency-ms", "0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert "pass another --port" in error("baseline-resnet18-breastmnist", "--port", str(busy.getsockname()[1]))


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_a_port_out_of_range_is_a_one_line_usage_error(capsys, port):
    from serving.__main__ import main

    assert main(["baseline-resnet18-breastmnist", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err == f"serving: error: --port must be between 1 and 65535, got {port}\n"


def test_runtime_errors_exit_with_1_usage_errors_with_2(capsys, monkeypatch):
    """After the arguments are checked, what fails (an export, the server, a model load) is a runtime error."""
    from serving.__main__ import main
    from zoo.store import WeightsCorruptedError

    for error, status in [(cli.ServeFailed("the models failed to load: boom"), 1),
                          (WeightsCorruptedError("weights changed on disk"), 1), (OSError("disk full"), 1),
                          (cli.UsageError("bad arguments"), 2)]:
        def fail(a, error=error):
            raise error

        monkeypatch.setattr(cli, "main", fail)
        assert main(["baseline-resnet18-breastmnist"]) == status, error
        err = capsys.readouterr().err
        assert err.startswith("serving: error: ") and err.count("\n") == 1, err
    assert cli.config_from_args(_parse("a", "--max-pixels", "100")).max_pixels_in_flight == 400  # 4 x by default
    assert cli.config_from_args(_parse("a", "--max-pixels-in-flight", "7")).max_pixels_in_flight == 7


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("training.dinomx.cli", "zoo.explain_cli")),
                    reason="zoo's parser also loads the pretrain and explain plugins, which are not in this checkout")
def test_zoo_serve_is_wired(capsys):
    from zoo.cli import main

    assert main(["serve", "baseline-resnet18-nosuchmnist"]) == 2
    assert "zoo: error: unknown zoo model" in capsys.readouterr().err
