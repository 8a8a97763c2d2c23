"""build/evaluate.py on plain checkpoints: a model against itself agrees everywhere, and the bf16 control row
(the reference computed in bfloat16) is reported beside it."""

from __future__ import annotations

import json

from build_helpers import random_text, tame_random_checkpoint
from trimode.build.evaluate import main


def test_self_agreement_is_exact_and_the_control_row_is_reported(tmp_path, capsys):
    ckpt = tame_random_checkpoint(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text(random_text(600, 3))
    assert main(["--reference", str(ckpt), "--quantized", str(ckpt), "--text-file", str(text), "--num-prompts", "4",
                 "--prompt-len", "8", "--new-tokens", "8", "--control"]) == 0
    control, same = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert control["quantized"].startswith("control") and 0.0 <= control["agreement"] <= 1.0
    assert control["tokens"] == same["tokens"] == 32
    assert same["agreement"] == same["agreement_teacher_forced"] == 1.0 and same["ppl_delta"] == 0.0
