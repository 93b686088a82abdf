"""Two processes x batch 8 must equal one process x batch 16: same loss, terms, grad norm and update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run(tmp_path, nproc, batch):
    tokenizer_dir = tmp_path / "tokenizer"
    if not tokenizer_dir.exists():
        from tiny import make_wordpiece_tokenizer
        make_wordpiece_tokenizer().save_pretrained(str(tokenizer_dir))
    out = tmp_path / f"log_{nproc}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "ddp_step.py"), str(out), str(batch), str(tokenizer_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_equal_one_large_batch(tmp_path):
    single = run(tmp_path, 1, 16)
    double = run(tmp_path, 2, 8)
    assert double["world_size"] == 2 and single["world_size"] == 1
    for key in ("loss", "grad_norm", "loss_kd", "loss_mlm", "loss_cos"):
        assert double[key] == pytest.approx(single[key], rel=1e-4), key
    assert double["param_sum"] == pytest.approx(single["param_sum"], rel=1e-6, abs=1e-5)
