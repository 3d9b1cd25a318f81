"""Bad input on the command line gives one line naming the problem, and starts nothing."""

import socket
import subprocess
import sys
import time

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
        (["run", "smok"], "did you mean 'smoke'"),
        (["run", "smoke", "--set", "train.lrr=1"], "unknown key 'train.lrr' (did you mean"),
        (["run", "smoke", "--set", "participants.1.role=spy"], "participants.1.role"),
        (["run", "smoke", "--set", "run.engine=cloud"], "run.engine: input should be"),
        (["study", "dlg-model"], "did you mean 'dlg-models'"),
        (["ensembler", "run", "nope"], "unknown ensembler preset 'nope'"),
    ],
)
def test_config_errors(tmp_path, args, expected):
    assert expected in one_line_error(fedleak(*args, cwd=tmp_path))
    assert not (tmp_path / "runs").exists()


def test_a_typo_fails_without_loading_torch(tmp_path):
    """The timing margin is generous (a loaded machine); the real check is that no heavy
    import happens before the settings are validated."""
    started = time.monotonic()
    result = fedleak("run", "smoke", "--set", "run.roundz=1", cwd=tmp_path)
    assert "did you mean 'run.rounds'" in one_line_error(result)
    assert time.monotonic() - started < 10
    code = (
        "import sys; from fedleak.cli import main\n"
        "rc = main(['run', 'smoke', '--set', 'run.roundz=1'])\n"
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False"]


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


def test_help_lists_the_presets(tmp_path):
    result = fedleak("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "gan-mnist-passive" in result.stdout and "dlg-models" in result.stdout


def test_presets_and_config_commands(tmp_path):
    listed = fedleak("presets", cwd=tmp_path)
    assert listed.returncode == 0 and "gan-mnist-passive" in listed.stdout
    assert "ensembler-cifar10-smoke" in listed.stdout and "gias-vs-ig" in listed.stdout
    shown = fedleak("config", "gan-mnist-dp", cwd=tmp_path)
    assert shown.returncode == 0 and "dp-epsilon = 100.0" in shown.stdout


def test_remote_run_needs_a_report_token(tmp_path):
    result = fedleak("run", "smoke", "--superlink", "127.0.0.1:1", cwd=tmp_path)
    assert "FEDLEAK_REPORT_TOKEN" in one_line_error(result)


@pytest.mark.parametrize(
    "args",
    [
        ["superlink", "--port", "99999"],
        ["node", "--superlink", "127.0.0.1:9093", "--runtime-port", "0"],
        ["node", "--superlink", "127.0.0.1:9093", "--runtime-port", "http"],
    ],
)
def test_a_bad_port_is_refused_by_name_not_with_a_traceback(tmp_path, args):
    result = fedleak(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "port" in result.stderr.strip().splitlines()[-1]


def test_each_supernode_gets_its_own_runtime_port():
    """Two `fedleak node`s on one host need distinct Runtime API ports (Flower's default is
    9094 for every SuperNode, and the second one fails to start)."""
    from fedleak.federation.deployment import supernode_command

    node = {"index": 1, "role": "honest"}
    default = supernode_command(node, "link:9093")
    chosen = supernode_command(node, "link:9093", runtime_port=9190)
    assert default[default.index("--port") + 1] == "9094"
    assert chosen[chosen.index("--port") + 1] == "9190"
