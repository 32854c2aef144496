"""The launch configs (``launch/*.yaml``) and the Slurm multi-node script: what they ask accelerate for."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


@pytest.mark.parametrize("name, distributed_type, zero_stage, offload", [
    ("ddp", "MULTI_GPU", None, None),
    ("zero2", "DEEPSPEED", 2, "none"),
    ("zero3", "DEEPSPEED", 3, "none"),
    ("zero3_offload", "DEEPSPEED", 3, "cpu"),
])
def test_launch_config(name, distributed_type, zero_stage, offload):
    config = yaml.safe_load((LAUNCH / f"{name}.yaml").read_text())
    assert config["distributed_type"] == distributed_type
    assert config["mixed_precision"] == "bf16" and config["use_cpu"] is False
    ds = config.get("deepspeed_config")
    if zero_stage is None:
        assert ds is None
        return
    assert ds["zero_stage"] == zero_stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
    if zero_stage == 3:  # the final save must be a loadable 16-bit model, loaded sharded
        assert ds["zero3_save_16bit_model"] is True and ds["zero3_init_flag"] is True


def shim(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_script_starts_one_accelerate_launch_per_node(tmp_path):
    """``srun`` (a shim) runs the per-node command once per node with its SLURM_NODEID; ``accelerate`` (a shim)
    records its arguments: machine rank per node, main address = the first host, world size = nodes x GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    shim(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    shim(bin_dir, "nvidia-smi", 'for i in 0 1 2 3; do echo "GPU $i: H100"; done\n')
    shim(bin_dir, "srun", 'for node in 0 1; do SLURM_NODEID=$node "${@:2}"; done\n')  # drops --kill-on-bad-exit
    shim(bin_dir, "accelerate", f'echo "node=$SLURM_NODEID $*" >> {record}\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]"}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sh"), "launch/zero3.yaml", "sft", "--config",
                           "recipes/vsp_spatial_planning/stage1_qwen2.5_vl_7b.yaml", "--output_dir", "out dir"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = record.read_text().splitlines()
    assert len(calls) == 2
    for node, call in enumerate(calls):
        assert call.startswith(f"node={node} launch --config_file launch/zero3.yaml")
        assert f"--machine_rank {node} " in call and "--num_machines 2 " in call and "--num_processes 8 " in call
        assert "--main_process_ip gpu-a " in call
        assert call.endswith("-m mirage_rl.cli sft --config recipes/vsp_spatial_planning/stage1_qwen2.5_vl_7b.yaml "
                             "--output_dir out dir")


def test_slurm_script_names_a_missing_config(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sh"), "launch/zero4.yaml", "sft"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_NNODES": "1"})
    assert proc.returncode == 2 and "launch/zero4.yaml" in proc.stderr
