"""Several processes per site: 2 gloo processes train the model 1 process trains.

Real torch.distributed on CPU: ``pretrain`` with ``Runtime(workers=2)`` spawns two processes
that shard every global batch, average gradients and the DINO center, and write one checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from fed_unimiss.checkpoint import latest_checkpoint, load_checkpoint
from fed_unimiss.data.phantom import write_phantoms
from fed_unimiss.runtime import Runtime
from fed_unimiss.ssl.config import recipe_from_dict
from fed_unimiss.ssl.trainer import CHECKPOINT_PREFIX, pretrain

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

SSL = {"batch_size_2d": 4, "batch_size_3d": 2, "steps_per_epoch": 2, "epochs": 4,
       "alternate_interval": 1, "crop_2d": 48, "view_depth": 8, "view_size": 48,
       "warmup_epochs": 1, "lr": 0.05, "freeze_last_layer": 0, "log_every": 1,
       "koleo_weight": 0.0, "threads": 1, "checkpoint_every": 3}


def _recipe(**ssl):
    return recipe_from_dict({"model": {"preset": "micro", "head_out_dim": 256},
                             "data": {"xray_size": 96}, "ssl": {**SSL, **ssl}})


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run, CHECKPOINT_PREFIX)
    assert ckpt is not None
    return load_checkpoint(ckpt)[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_two_processes_train_the_model_one_process_trains(phantom_dir, tmp_path, centering):
    """Same recipe, seed and global batch; 6 steps (2D and 3D, with a checkpoint in between).

    Stated tolerance: the per-step losses within 1e-5 relative, the whole exchanged state
    (student, teacher, center) within 1e-4 relative L2 and the center within 1e-5. The runs
    differ only in float summation order (gradients and center sums are added per process, then
    across). Single tensors are not compared: the key half of ``attn.kv.bias`` has an exactly
    zero gradient in exact arithmetic (softmax ignores a constant added to every key), so AdamW
    steps it by rounding noise in both runs. Measured here: losses equal to 6 digits, state
    5e-6, center 1e-7.
    """
    recipe = _recipe(teacher_centering=centering)
    one = pretrain(recipe, [phantom_dir], tmp_path / "one", steps=6, progress=False,
                   runtime=Runtime(device="cpu"))
    two = pretrain(recipe, [phantom_dir], tmp_path / "two", steps=6, progress=False,
                   runtime=Runtime(device="cpu", workers=2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["samples_3d"] == two["samples_3d"] > 0 and one["samples_2d"] == two["samples_2d"]
    a, b = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    exchanged = [k for k in a if not k.startswith("optim.")]
    assert set(exchanged) <= set(b)
    whole = _relative(torch.cat([b[k].flatten() for k in exchanged]),
                      torch.cat([a[k].flatten() for k in exchanged]))
    assert whole < 1e-4, whole
    assert _relative(b["center"], a["center"]) < 1e-5
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").open()]
              for run in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(*losses, strict=True)), losses
    # one model, one set of checkpoints: only rank 0 wrote them
    names = sorted(p.name for p in (tmp_path / "two").glob(f"{CHECKPOINT_PREFIX}*.json"))
    assert names == ["ckpt_00000003.json", "ckpt_00000006.json"]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert rows and all(r["world_size"] == 2 and r["samples_per_s"] > 0 for r in rows)
    assert all(r["batch"] == (4 if r["phase"] == "2d" else 2) for r in rows)  # global batch


def test_data_parallel_refuses_what_it_cannot_split(phantom_dir, tmp_path):
    with pytest.raises(ValueError, match="ssl.batch_size_3d: 2 is smaller than workers x "
                                         "accumulate = 4"):
        pretrain(_recipe(accumulate=2), [phantom_dir], tmp_path / "run", steps=2,
                 progress=False, runtime=Runtime(device="cpu", workers=2))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fed_unimiss.cli.main", "pretrain", *args]


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_a_killed_worker_fails_the_run_cleanly_and_resume_continues(phantom_dir, tmp_path):
    """SIGKILL one of two workers mid-run: the command exits 1 naming the dead worker, the
    other worker does not hang, every checkpoint on disk is complete, and --resume (with 2
    processes again) continues from the last one."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "micro", "head_out_dim": 256},
                                      "data": {"xray_size": 96},
                                      "ssl": {**SSL, "epochs": 200, "checkpoint_every": 2}}))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("--config", str(config), "--data", str(phantom_dir), "--out",
                                 str(run), "--nproc", "2", "--device", "cpu", "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(run, CHECKPOINT_PREFIX) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        workers = _workers(proc)
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "data-parallel worker" in err and "died" in err
    for sidecar in run.glob(f"{CHECKPOINT_PREFIX}*.json"):  # every committed checkpoint loads
        load_checkpoint(sidecar.with_suffix(".safetensors"))
    done = int(json.loads(latest_checkpoint(run, CHECKPOINT_PREFIX).with_suffix(".json")
                          .read_text())["step"])
    assert not psutil.Process().children(recursive=True) or all(
        "spawn_main" not in " ".join(c.cmdline()) for c in psutil.Process().children(True))
    out = subprocess.run(_cli("--config", str(config), "--data", str(phantom_dir), "--out",
                              str(run), "--nproc", "2", "--device", "cpu", "--resume",
                              "--steps", str(done + 2), "--no-progress"),
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"pretrained steps {done}..{done + 2}" in out.stdout
    assert "x 2 process(es)" in out.stdout


def test_a_site_with_two_workers_returns_one_update_per_round(phantom_dir, tmp_path):
    """The real ServerApp and ClientApp in-process: each site trains its round with 2 gloo
    processes (bf16) and the aggregator receives exactly one update per site and round."""
    from aggregator.simulate_cli import simulate

    other = tmp_path / "site-b"
    write_phantoms(other, n_ct=1, n_xray=4, seed=9)
    federation = yaml.safe_load((REPO / "configs" / "federation" / "micro.yaml").read_text())
    federation["recipe"] = str(REPO / "configs" / "pretrain" / "micro.yaml")
    federation["recipe_overrides"]["ssl"]["batch_size_3d"] = 2  # a CT item per process
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(federation))
    runtime = Runtime(device="cpu", precision="bf16", workers=2)
    simulate(config, [("A", phantom_dir), ("B", other)], 2, tmp_path / "run",
             runtime=runtime.to_node_config())
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").open()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert sorted(row["per_site"]) == ["A", "B"] and not row["rejected"]
        assert all(site["steps"] == 4 for site in row["per_site"].values())
    assert rows[1]["per_site"]["A"]["samples_3d"] == 4 * 2  # round 2: CT steps, global batch 2
    assert not list((tmp_path / "run" / "sites" / "A" / "rounds").iterdir())  # scratch cleaned


def test_site_settings_refuse_runtimes_dp_cannot_train():
    from fed_unimiss.privacy.config import PrivacyConfig
    from site_client.supernode import check_runtime

    dp = PrivacyConfig(enabled=True)
    with pytest.raises(ValueError, match="precision: bf16 with differential privacy"):
        check_runtime(Runtime(device="cpu", precision="bf16"), dp)
    with pytest.raises(ValueError, match="workers: 2 with differential privacy"):
        check_runtime(Runtime(device="cpu", workers=2), dp)
    check_runtime(Runtime(device="cpu", precision="bf16", workers=2), None)
