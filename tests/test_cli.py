"""Bad input on the command line gives one line naming the problem, and starts nothing."""

import socket
import subprocess
import sys

import pytest


def fedleak(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedleak.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedleak: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["run", "smoke", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["run", "smoke", "--set", "participants.1.role=spy"], "unknown role 'spy'"),
        (["run", "smoke", "--set", "run.engine=cloud"], "run.engine must be one of"),
    ],
)
def test_config_errors(tmp_path, args, expected):
    assert expected in one_line_error(fedleak(*args, cwd=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_wrong_data_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    line = one_line_error(fedleak("run", "smoke", "--set", f'data.root="{missing}"', cwd=tmp_path))
    assert str(missing) in line
    assert not (tmp_path / "runs").exists()


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fedleak("run", "smoke", "--set", f"deployment.superlink-port={port}", cwd=tmp_path)
    assert f"port {port} (deployment.superlink-port) is already in use" in one_line_error(result)


def test_presets_and_config_commands(tmp_path):
    listed = fedleak("presets", cwd=tmp_path)
    assert listed.returncode == 0 and "gan-mnist-passive" in listed.stdout
    shown = fedleak("config", "gan-mnist-dp", cwd=tmp_path)
    assert shown.returncode == 0 and "dp-epsilon = 100.0" in shown.stdout
