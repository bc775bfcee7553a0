"""`bnfold convert` as a user runs it: exit codes, messages, JSON, atomic packages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.package_format import sha256_file

from convert_helpers import run_onnx, torch_eval, torch_train_mode_bn, within_float32_tolerance
from onnx_helpers import array, initializer, make_model

runner = CliRunner()

NETS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def _calibrate(model, shape):
        torch.manual_seed(0)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(*shape) * 2 + 1)
        return model.eval()

    def mlp():
        torch.manual_seed(1)
        return _calibrate(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                        nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3)), (8, 6))

    def cnn():
        torch.manual_seed(2)
        return _calibrate(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)), (8, 2, 6, 6))

    def uncalibrated_mlp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                             nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3)).eval()

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.linear(x)
            return -self.linear(x)

    def branchy():
        return DataDependent().eval()

    def slow():
        import time
        print("factory running", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture()
def nets(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def load_factory(nets: Path, name: str) -> nn.Module:
    namespace: dict = {}
    exec(compile(nets.read_text(), str(nets), "exec"), namespace)
    return namespace[name]()


def test_convert_factory_writes_a_complete_package(nets: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo))
    assert result.exit_code == 0, result.output
    package = repo / "mlp" / "1"
    assert sorted(p.name for p in package.iterdir()) == [
        "calibration.onnx",
        "manifest.json",
        "model.onnx",
        "train.onnx",
    ]
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["name"] == "mlp" and manifest["version"] == 1
    assert manifest["source"]["kind"] == "factory"
    assert manifest["source"]["sha256"] == sha256_file(nets)
    assert manifest["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
    assert manifest["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert manifest["batchnorm"]["total"] == 2
    assert {f["direction"] for f in manifest["batchnorm"]["folded"]} == {"forward", "backward"}
    assert [layer["channels"] for layer in manifest["batchnorm"]["layers"]] == [8, 8]
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["max_abs_err"] <= 1e-5
    for name, digest in manifest["files"].items():
        assert sha256_file(package / name) == digest
    for file in ("model.onnx", "train.onnx", "calibration.onnx"):
        onnx.checker.check_model(str(package / file))
    assert {"torch", "onnx", "onnxruntime", "opset"} <= set(manifest["tool_versions"])

    # Dynamic batch and exactness, on inputs the converter never saw.
    model = load_factory(nets, "mlp")
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 6)).astype(np.float32)
        (actual,) = run_onnx(package / "model.onnx", x)
        assert within_float32_tolerance(actual, torch_eval(model, x))

    # A second conversion takes the next version.
    again = invoke(
        "convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo), "--name", "mlp"
    )
    assert again.exit_code == 0 and (repo / "mlp" / "2" / "manifest.json").is_file()


def test_train_graph_matches_torch_train_mode_and_outputs_batch_statistics(
    nets: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    assert (
        invoke("convert", f"{nets}:cnn", "--input-shape", "1,2,6,6", "-r", str(repo)).exit_code == 0
    )
    package = repo / "cnn" / "1"
    model = load_factory(nets, "cnn")
    running_before = model[1].running_mean.clone()
    x = (np.random.default_rng(5).standard_normal((6, 2, 6, 6)) * 3 + 2).astype(np.float32)
    output, batch_mean, batch_var = run_onnx(package / "train.onnx", x)
    assert within_float32_tolerance(output, torch_train_mode_bn(model, x))
    with torch.no_grad():
        conv_out = model[0](torch.from_numpy(x)).double()
    np.testing.assert_allclose(
        batch_mean, conv_out.mean(dim=(0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        batch_var, conv_out.var(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-5, atol=1e-6
    )
    # Train and eval really differ, and BatchNorm is the only reason.
    (eval_output,) = run_onnx(package / "model.onnx", x)
    assert np.abs(eval_output - output).max() > 1e-3
    assert torch.equal(model[1].running_mean, running_before)
    names = [o.name for o in onnx.load(str(package / "train.onnx")).graph.output]
    assert names == ["output", "1.batch_mean", "1.batch_var"]


def test_json_report(nets: Path, tmp_path: Path) -> None:
    result = invoke(
        "convert", f"{nets}:cnn", "--input-shape", "1,2,6,6", "-r", str(tmp_path), "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["batchnorm"]["folded"] == [{"name": "1", "into": "0", "direction": "forward"}]
    assert report["verification"]["passed"] is True


def test_sample_file_is_verified(nets: Path, tmp_path: Path) -> None:
    sample = tmp_path / "batch.npy"
    np.save(sample, np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32))
    result = invoke(
        "convert",
        f"{nets}:mlp",
        "--input-shape",
        "1,6",
        "-r",
        str(tmp_path / "r"),
        "--sample",
        str(sample),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verification"]["samples"] > 5 + 21


def test_weights_are_loaded_with_weights_only(nets: Path, tmp_path: Path) -> None:
    trained = load_factory(nets, "mlp")
    weights = tmp_path / "mlp.pt"
    torch.save(trained.state_dict(), weights)
    repo = tmp_path / "repo"
    result = invoke(
        "convert",
        f"{nets}:uncalibrated_mlp",
        "--weights",
        str(weights),
        "--input-shape",
        "1,6",
        "-r",
        str(repo),
    )
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(np.float32)
    (actual,) = run_onnx(repo / "uncalibrated_mlp" / "1" / "model.onnx", x)
    assert within_float32_tolerance(actual, torch_eval(trained, x))
    manifest = json.loads((repo / "uncalibrated_mlp" / "1" / "manifest.json").read_text())
    assert manifest["source"]["weights_sha256"] == sha256_file(weights)


def test_pickled_model_needs_trust_pickle(nets: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "whole.pt"
    torch.save(load_factory(nets, "mlp"), pickled)
    refused = invoke("convert", str(pickled), "--input-shape", "1,6", "-r", str(tmp_path / "r"))
    assert refused.exit_code == 2
    assert "--trust-pickle" in refused.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    accepted = invoke(
        "convert", str(pickled), "--trust-pickle", "--input-shape", "1,6", "-r", str(tmp_path / "r")
    )
    assert accepted.exit_code == 0, accepted.output
    assert (tmp_path / "r" / "whole" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.py:build", "--input-shape", "1,6"], "no such file"),
        (["{nets}:mlp", "--input-shape", "1,x"], "invalid --input-shape"),
        (["{nets}:mlp", "--input-shape", "0,6"], "must be positive"),
        (["{nets}:mlp"], "--input-shape is required"),
        (["{nets}:mlp", "--input-shape", "1,7"], "does not run on an input of shape"),
        (["{nets}:nothing", "--input-shape", "1,6"], "no callable 'nothing'"),
        (["{nets}:branchy", "--input-shape", "1,6"], "if x.sum() > 0"),
        (["no_such_builtin"], "unknown built-in model 'no_such_builtin'"),
        (["{nets}:mlp", "--input-shape", "1,6", "--weights", "{tmp}/none.pt"], "no such file"),
        (["{nets}:mlp", "--input-shape", "1,6", "--sample", "{tmp}/none.npy"], "no such file"),
        (["{nets}:mlp", "--input-shape", "1,6", "--name", "../escape"], "invalid model name"),
        (["nonexistent.onnx"], "no such file"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    nets: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    filled = [arg.format(nets=nets, tmp=tmp_path) for arg in args]
    result = invoke("convert", *filled, "-r", str(tmp_path / "repo"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not any((tmp_path / "repo").glob("*/*")) if (tmp_path / "repo").exists() else True


def test_weights_that_are_not_a_state_dict_are_refused(nets: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    result = invoke(
        "convert",
        f"{nets}:mlp",
        "--input-shape",
        "1,6",
        "--weights",
        str(bad),
        "-r",
        str(tmp_path / "r"),
    )
    assert result.exit_code == 2 and "state_dict" in result.output


def test_existing_version_is_refused(nets: Path, tmp_path: Path) -> None:
    args = ["convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(tmp_path), "--version", "3"]
    assert invoke(*args).exit_code == 0
    second = invoke(*args)
    assert second.exit_code == 2 and "already exists" in second.output


def test_failed_verification_exits_1_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose export cannot match torch must not produce a package.

    Its forward draws a Python random number on every call: tracing freezes
    one draw into the graph, so the export disagrees with the live model.
    """
    nets = tmp_path / "diverging.py"
    nets.write_text(
        textwrap.dedent(
            """
        import random
        from torch import nn

        class Diverging(nn.Module):
            def forward(self, x):
                return x * (1.0 + random.random())

        def build():
            return nn.Sequential(nn.Linear(4, 4), Diverging()).eval()
        """
        )
    )
    result = invoke(
        "convert", f"{nets}:build", "--input-shape", "1,4", "-r", str(tmp_path / "repo")
    )
    assert result.exit_code == 1, result.output
    assert "verification failed" in result.output
    # nothing written: not even the repository directory the conversion created
    # (both conversion paths share the skeleton's clean-up)
    assert not (tmp_path / "repo").exists()


def test_killed_conversion_leaves_no_visible_package(nets: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle: only a hidden staging dir may remain, and the next write removes it."""
    repo = tmp_path / "repo"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from bnfold.convert.package import staged_package
        with staged_package(Path({str(repo)!r}), "half", None) as staged:
            (staged.directory / "model.onnx").write_bytes(b"partial")
            print("staged", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "staged"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert not (repo / "half").exists()
    assert [p.name.startswith(".") for p in repo.iterdir()] == [True]
    assert invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo)).exit_code == 0
    assert sorted(p.name for p in repo.iterdir()) == ["mlp"]


def _ctrl_c_as_in_a_terminal() -> None:
    """Give the child the SIGINT disposition of a command typed in a terminal.

    A shell without job control starts background jobs with SIGINT ignored, and
    children inherit that: under `make test &` (or nohup) Python would never
    raise KeyboardInterrupt and this test would wait out the factory's sleep.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_conversion_writes_nothing(nets: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bnfold",
            "convert",
            f"{nets}:slow",
            "--input-shape",
            "1,6",
            "-r",
            str(repo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "factory running"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert not repo.exists() or not any(p for p in repo.iterdir() if not p.name.startswith("."))


def test_onnx_source_is_dispatched(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf")
    result = invoke("convert", str(garbage), "-r", str(tmp_path / "repo"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_version_and_help() -> None:
    assert "bnfold 0.1.0" in invoke("--version").output
    help_text = invoke("convert", "--help").output
    assert "Examples" in help_text and "--trust-pickle" in help_text


# ---- refused before anything is written: one line, exit 2 ----------------------------


def one_line_error(result) -> str:
    """The whole output of a refused conversion: exit 2, one `error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("99999999999999999999", "invalid version 99999999999999999999"),
        ("9223372036854775808", "invalid version 9223372036854775808"),
        ("0", "invalid version 0"),
    ],
)
def test_version_outside_1_to_2_63_minus_1_is_refused(
    nets: Path, tmp_path: Path, version: str, message: str
) -> None:
    repo = tmp_path / "repo"
    args = ["convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo)]
    line = one_line_error(invoke(*args, "--version", version))
    assert message in line and "from 1 to 9223372036854775807" in line
    assert not repo.exists()


def test_version_names_the_service_cannot_read_do_not_count(nets: Path, tmp_path: Path) -> None:
    """A version past 2**63 - 1 (written by an older bnfold) or `007` is no package version."""
    repo = tmp_path / "repo"
    for stray in ("99999999999999999999", "007"):
        (repo / "mlp" / stray).mkdir(parents=True)
    result = invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo))
    assert result.exit_code == 0, result.output
    assert (repo / "mlp" / "1" / "manifest.json").is_file()


def test_no_version_after_the_largest(nets: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "mlp" / "9223372036854775807").mkdir(parents=True)
    result = invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo))
    assert result.exit_code == 2, result.output
    assert "already has version 9223372036854775807, the largest there is" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_repository_that_is_not_a_directory_is_refused(
    nets: Path, tmp_path: Path, where: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a repository")
    repo = blocker if where == "a file" else blocker / "repo"
    line = one_line_error(invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo)))
    assert f"cannot use {repo} as a model repository" in line
    assert "not a directory" in line
    assert blocker.read_text() == "not a repository"


def test_model_name_taken_by_a_file_is_refused(nets: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mlp").write_text("a file where the model directory goes")
    result = invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo))
    assert result.exit_code == 2, result.output
    assert f"{repo / 'mlp'} is not a directory" in result.output
    assert "Traceback" not in result.output


def test_input_shape_too_large_to_verify_is_refused_before_allocating(
    nets: Path, tmp_path: Path
) -> None:
    """1e12 × 64 float32 values would be 233 TiB: refused by the 2**28-value bound instead."""
    repo = tmp_path / "repo"
    result = invoke("convert", f"{nets}:mlp", "--input-shape", "1000000000000,64", "-r", str(repo))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "input shape 1000000000000,64 is too large to verify" in result.output
    assert "64,000,000,000,000 values (233 TiB of float32)" in result.output
    assert "at most 268,435,456 values (2**28, 1 GiB of float32)" in result.output
    assert not repo.exists()


@pytest.mark.parametrize(
    ("umask", "directory_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
    ids=["umask-022", "umask-027"],
)
def test_package_modes_follow_the_umask(
    nets: Path, tmp_path: Path, umask: int, directory_mode: int, file_mode: int
) -> None:
    """Whoever may read the repository may serve the package (mkdtemp would give 0700)."""
    repo = tmp_path / "repo"
    previous = os.umask(umask)
    try:
        result = invoke("convert", f"{nets}:mlp", "--input-shape", "1,6", "-r", str(repo))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    package = repo / "mlp" / "1"
    for directory in (repo, repo / "mlp", package):
        assert directory.stat().st_mode & 0o777 == directory_mode, directory
    for file in package.iterdir():
        assert file.stat().st_mode & 0o777 == file_mode, file


# ---- --input-shape for an ONNX source ------------------------------------------------


def _needs_height_4(path: Path) -> Path:
    """X (N, 3, H) ─► Flatten ─► Gemm(12 → 2): only runs with H = 4, the symbolic axis."""
    nodes = [
        helper.make_node("Flatten", ["X"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "W"], ["Y"], name="gemm", transB=1),
    ]
    model = make_model(nodes, [("X", ["N", 3, "H"])], ["Y"], [initializer("W", array(1, 2, 12))])
    onnx.save(model, str(path))
    return path


def test_input_shape_sets_the_symbolic_axes_of_an_onnx_source(tmp_path: Path) -> None:
    source = _needs_height_4(tmp_path / "height.onnx")
    repo = tmp_path / "repo"
    guessed = invoke("convert", str(source), "-r", str(repo))
    assert (
        guessed.exit_code == 2 and "does not run on inputs of shape X (1, 3, 16)" in guessed.output
    )
    pinned = invoke("convert", str(source), "-r", str(repo), "--input-shape", "1,3,4", "--json")
    assert pinned.exit_code == 0, pinned.output
    assert json.loads(pinned.stdout)["inputs"] == [
        {"name": "X", "datatype": "FP32", "shape": [-1, 3, -1]}
    ]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("1,3", "--input-shape 1,3 has 2 axes; input X has 3: (?, 3, ?)"),
        ("1,5,4", "--input-shape 1,5,4 sets axis 1 to 5; input X fixes it at 3: (?, 3, ?)"),
        ("1,3,x", "invalid --input-shape '1,3,x'"),
    ],
)
def test_input_shape_that_does_not_fit_an_onnx_source_is_refused(
    tmp_path: Path, shape: str, message: str
) -> None:
    source = _needs_height_4(tmp_path / "height.onnx")
    line = one_line_error(
        invoke("convert", str(source), "-r", str(tmp_path / "repo"), "--input-shape", shape)
    )
    assert message in line
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("folder", ["convert", "bnfold", "torch"])
def test_an_untraceable_line_is_shown_even_in_a_folder_named_like_a_library(
    tmp_path: Path, folder: str
) -> None:
    """The user's frame is found by module identity: a project folder called `convert`
    (or `bnfold`, `torch`) was taken for bnfold's own code and the line was hidden."""
    nets = tmp_path / folder / "nets.py"
    nets.parent.mkdir()
    nets.write_text(NETS)
    result = invoke(
        "convert", f"{nets}:branchy", "--input-shape", "1,6", "-r", str(tmp_path / "repo")
    )
    line = one_line_error(result)
    assert "torch.fx cannot trace" in line
    assert "(at nets.py:" in line and "if x.sum() > 0:" in line


def test_a_version_taken_at_the_last_moment_is_refused_not_replaced(
    nets: Path, tmp_path: Path
) -> None:
    """Another writer creates REPO/mlp/1 (empty) while this conversion runs: a plain rename
    replaced that directory silently. Now the commit claims the name first and refuses."""
    from bnfold.convert.errors import PackageError
    from bnfold.convert.package import staged_package

    repo = tmp_path / "repo"
    with staged_package(repo, "mlp", 1) as staged:
        for file in ("model.onnx", "calibration.onnx"):
            (staged.directory / file).write_bytes(b"x")
        (repo / "mlp" / "1").mkdir(parents=True)
        tensor = {"name": "input", "datatype": "FP32", "shape": [-1, 6]}
        with pytest.raises(PackageError, match="already exists"):
            staged.commit({"inputs": [tensor], "outputs": [tensor]})
    assert list((repo / "mlp" / "1").iterdir()) == []
