"""Runtime settings and mode defaults have one home each; the CLI options, the Triton parameters, the API and the
executor registry read them from there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_lm
from trimode.runtime import settings
from trimode.runtime.cli.main import build_parser
from trimode.runtime.request import ARConfig, DiffusionConfig, RequestError, SpecConfig, mode_config
from trimode.runtime.serving.triton_request import PARAMETERS, parse_parameters
from trimode.runtime.settings import DEFAULTS, RuntimeSettings, SettingsError


@pytest.mark.parametrize("changes, match", [
    (dict(num_pages=0), "num_pages must be an integer >= 1"),
    (dict(page_size=2.5), "page_size must be an integer >= 1"),
    (dict(max_batch_size=True), "max_batch_size must be an integer >= 1"),
    (dict(kernels="cuda"), "kernels must be one of"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(threads=-1), "threads must be an integer >= 0"),
])
def test_bad_settings_are_refused_naming_the_setting(changes, match):
    with pytest.raises(SettingsError, match=match):
        RuntimeSettings(**changes)


def test_cli_options_and_triton_parameters_come_from_the_settings():
    args = build_parser().parse_args(["generate", "--model", "m", "--num-pages", "7", "--page-size", "4",
                                      "--max-concurrent-requests", "3", "--kernels", "reference", "x"])
    s = settings.from_args(args, settings.GENERATE_OPTIONS)
    assert (s.num_pages, s.page_size, s.max_batch_size, s.kernels, s.executor) == (7, 4, 3, "reference", "torch")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--model", "m", "--num-pages", "0", "x"])
    assert e.value.code == 2
    # the settings' Triton parameters (all but the kernels) are the model's, with the settings' defaults
    assert {f for _, _, f in settings.TRITON_PARAMETERS.values()} == {"num_pages", "page_size", "max_batch_size",
                                                                      "executor", "dtype", "threads"}
    for name, (default, _, field) in settings.TRITON_PARAMETERS.items():
        assert PARAMETERS[name][0] == default == str(getattr(DEFAULTS, field)), name
    parsed = parse_parameters({"num_pages": "9", "max_concurrent_requests": "5", "model_dir": "m"})
    s = settings.from_parameters(parsed)
    assert (s.num_pages, s.max_batch_size, s.page_size) == (9, 5, DEFAULTS.page_size)
    assert settings.from_parameters(parse_parameters({**settings.to_parameters(s), "model_dir": "m"})) == s


def test_api_sizes_come_from_the_settings(ckpt):
    lm = make_lm(ckpt, settings=RuntimeSettings(num_pages=24, page_size=8, max_batch_size=3))
    assert (lm.cache.num_pages, lm.cache.page_size, lm.engine.max_batch_size) == (256, 4, 3)  # keywords win
    lm = make_lm(ckpt, max_batch_size=5)
    assert (lm.cache.num_pages, lm.engine.max_batch_size, lm.settings.max_batch_size) == (256, 5, 5)


def test_mode_config_fills_the_project_defaults():
    assert mode_config("ar", 16) == ARConfig()
    assert mode_config("diffusion", 16) == DiffusionConfig(16, "threshold", 0.9)
    assert mode_config("diffusion", 16, 8, policy="topk") == DiffusionConfig(8, "topk", None)
    assert mode_config("spec", 16) == SpecConfig(16, 0.0, True)
    assert mode_config("spec", 16, 4, 0.5, use_lora=False) == SpecConfig(4, 0.5, False)
    with pytest.raises(RequestError, match="unknown mode 'fast'"):
        mode_config("fast", 16)
    with pytest.raises(RequestError, match="block_length must be an integer >= 1"):
        mode_config("spec", 16, 0)


def test_executors_are_found_by_name_without_importing_them_first():
    """A fresh process that never imported the onnxruntime executor still finds it by name (it then fails on
    the missing engine directory, not on an unknown name)."""
    code = ("from trimode.runtime.executors.base import make_executor\n"
            "try:\n    make_executor('onnxruntime')\nexcept TypeError as e:\n    print('TypeError', e)\n"
            "try:\n    make_executor('nope')\nexcept ValueError as e:\n    print('ValueError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "TypeError" in out and "engine_dir" in out, out
    assert "unknown executor 'nope'" in out and "'onnxruntime'" in out and "'tensorrt'" in out, out


def test_threads_setting_reaches_cli_triton_and_executors(ckpt, monkeypatch):
    """One setting, ``threads``: a ``trimode generate`` option and a Triton parameter; the torch executor gives
    it to torch's pool, the onnxruntime executor to its own pool and leaves torch one thread."""
    args = build_parser().parse_args(["generate", "--model", "m", "--threads", "3", "x"])
    assert settings.from_args(args, settings.GENERATE_OPTIONS).threads == 3
    unset = build_parser().parse_args(["generate", "--model", "m", "x"])  # not given: the default, 0
    assert unset.threads is None and settings.from_args(unset, settings.GENERATE_OPTIONS).threads == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--threads", "-2", "x"])
    assert settings.from_parameters(parse_parameters({"threads": "2", "model_dir": "m"})).threads == 2
    assert RuntimeSettings(threads=2).executor_kwargs == {"threads": 2}
    assert RuntimeSettings(threads=2, executor="tensorrt").executor_kwargs == {}
    assert settings.ThreadPlan.for_executor("torch", 3) == settings.ThreadPlan(3, 0)
    assert settings.ThreadPlan.for_executor("onnxruntime", 3) == settings.ThreadPlan(1, 3)
    monkeypatch.setenv(settings.THREADS_ENV, "5")
    assert settings.resolve_threads(0) == 5 and settings.resolve_threads(2) == 2
    monkeypatch.setenv(settings.THREADS_ENV, "many")
    with pytest.raises(SettingsError, match="TRIMODE_THREADS must be an integer >= 1"):
        settings.resolve_threads(0)
    monkeypatch.delenv(settings.THREADS_ENV)
    assert settings.resolve_threads(0) == settings.machine_threads() >= 1
    # by default small models get one thread, large ones the machine's (one per BYTES_PER_THREAD of weights)
    assert settings.resolve_threads(0, weight_bytes=12 << 20) == 1
    assert settings.resolve_threads(0, weight_bytes=1 << 40) == settings.machine_threads()
    assert settings.resolve_threads(3, weight_bytes=1) == 3
    import torch

    old = torch.get_num_threads()
    try:
        lm = make_lm(ckpt, settings=RuntimeSettings(threads=2))
        assert lm.executor.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_engine_limits_size_only_what_was_not_given():
    """An engine directory's limits replace num_pages / max_batch_size left unset; a value given explicitly, even
    one equal to the default, is the user's: above the limit it is refused."""
    from pathlib import Path

    from trimode.runtime.assembly import settings_within
    from trimode.runtime.executors.engine_dir import EngineLimits, EngineMismatch

    limits = EngineLimits(str(Path("eng")), ("ar",), max_batch=8, max_seq=64, block_length=4, page_size=4,
                          max_pages=256, max_tokens={})
    sized = settings_within(DEFAULTS, limits)
    assert (sized.num_pages, sized.max_batch_size, sized.page_size) == (256, 8, 4)
    assert settings_within(DEFAULTS.with_(num_pages=100), limits).num_pages == 100
    with pytest.raises(EngineMismatch, match="max_pages_total"):
        settings_within(DEFAULTS.with_(num_pages=DEFAULTS.num_pages), limits)  # 512 given: more than 256
    # the CLI leaves an option not given unset, and one given set, whatever its value
    args = build_parser().parse_args(["generate", "--engine", "e", "x"])
    assert settings.from_args(args, settings.GENERATE_OPTIONS).given == frozenset()
    args = build_parser().parse_args(["generate", "--engine", "e", "--num-pages", "512", "x"])
    assert "num_pages" in settings.from_args(args, settings.GENERATE_OPTIONS).given
