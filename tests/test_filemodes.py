"""File modes of what the package writes: the mode ``open()`` gives under the umask, never a private 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from diffusers_svdquant import filemodes
from diffusers_svdquant.calibration import CalibrationStats
from diffusers_svdquant.hub.checksums import write_checksums


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=oct)
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert filemodes.umask() == mask
    assert filemodes.umask() == mask  # reading twice: the first read left it as it was


def test_as_new_files_gives_open_s_mode(mask, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    private = tmp_path / "private"
    private.write_text("x")
    os.chmod(private, 0o600)
    filemodes.as_new_files([private])
    assert _mode(private) == _mode(plain) == 0o666 & ~mask


def test_calibration_file_and_checksums_get_the_umask_mode(mask, tmp_path):
    stats = CalibrationStats(act_absmax={"a.b": torch.ones(64)}, num_tokens={"a.b": 3})
    stats.save(tmp_path / "stats.safetensors")  # through mkstemp and safetensors: both create files 0600
    assert _mode(tmp_path / "stats.safetensors") == 0o666 & ~mask
    write_checksums(tmp_path)
    assert _mode(tmp_path / "svdquant_checksums.json") == 0o666 & ~mask
