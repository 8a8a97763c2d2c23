import json
import subprocess
import sys

import pytest

from trimode.runtime.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trimode.runtime.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_generate_streams_text_and_counters(ckpt, mode, capsys):
    assert main(["generate", "--model", ckpt, "--mode", mode, "--max-new-tokens", "12", "--block-length", "4",
                 "w5 w6 w7"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"[{mode}] ") and "tokens/forward" in out[-1] and "tokens/s" in out[-1]
    assert out[0].strip(), "the generated text is streamed before the counters"


def test_generate_json_counters(ckpt, capsys):
    assert main(["generate", "--model", ckpt, "--mode", "spec", "--max-new-tokens", "9", "--json", "w5 w9"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["num_tokens"] == 9 and data["forwards"]["verify"] == len(data["accepted_lengths"])


@pytest.mark.parametrize("args, message", [
    (["--mode", "beam"], "argument --mode: invalid choice: 'beam' (choose from 'ar', 'diffusion', 'spec', 'fused_spec', 'auto')"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--mode", "diffusion", "--policy", "topk", "--threshold", "0.5"], "--threshold applies only to --policy threshold"),
    (["--mode", "ar", "--threshold", "0.5"], "--threshold applies to --mode diffusion / spec, not ar"),
    (["--mode", "spec", "--num-subblocks", "2"], "--num-subblocks applies to --mode fused_spec, not spec"),
    (["--mode", "auto", "--policy", "topk"], "--policy applies to --mode diffusion, not auto"),
    (["--executor", "onnxruntime"], "--executor onnxruntime runs an engine directory (--engine DIR); a checkpoint "
                                    "(--model) runs on torch"),
])
def test_bad_arguments_name_the_argument(ckpt, args, message):
    proc = _cli("generate", "--model", ckpt, *args, "w5")
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_model_dir(tmp_path):
    proc = _cli("generate", "--model", str(tmp_path), "w5")
    assert proc.returncode == 2 and "--model:" in proc.stderr and "config.json" in proc.stderr


def test_bad_engine_dir_is_one_error_line_and_no_executor_choice(tmp_path):
    proc = _cli("generate", "--engine", str(tmp_path / "nope"), "w5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"trimode: error: --engine: {tmp_path / 'nope'} is not a directory"]
