"""Faults and bad input: kill -9 + resume, NaN losses, CLI validation."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import make_dataclass

import pytest
import torch

import train_common as tc
import vqvae_phase1_train as p1
import vqvae_phase1b_train_lora as p1b
import vqvae_phase2_train_adapters as p2
from vqvae_phase1_model import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_phase1(args, env):
    return subprocess.Popen([sys.executable, "vqvae_phase1_train.py", "--preset", "tiny", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_reaches_the_same_budget(tmp_path, teacher_cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    base = ["--teacher_cache", teacher_cache_dir, "--max_steps", "60", "--eval_every", "5", "--log_every", "1"]
    straight = tmp_path / "straight.pt"
    assert _run_phase1([*base, "--output", str(straight)], env).wait(timeout=300) == 0
    killed = tmp_path / "killed.pt"
    proc = _run_phase1([*base, "--output", str(killed)], env)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a checkpoint in the middle of the run, then kill -9
        if killed.exists() and 10 <= load_checkpoint(str(killed))["step"] < 50:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(str(killed))["step"]
    assert step_at_kill < 60
    assert _run_phase1([*base, "--output", str(killed), "--resume"], env).wait(timeout=300) == 0
    a, b = load_checkpoint(str(killed)), load_checkpoint(str(straight))
    assert a["step"] == b["step"] == 60
    assert a["tokens_seen"] == b["tokens_seen"]
    assert a["resume"]["data_position"] == b["resume"]["data_position"]  # nothing repeated or skipped
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]
    logged = lambda run: [(r["kind"], r["step"]) for r in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
                          if r["kind"] == "train"]
    assert logged("killed_run") == logged("straight_run")  # each step's row once, in order


def _toy_loop(tmp_path, losses, skip=0):
    cfg = make_dataclass("C", [("warmup_steps", int, 1), ("lr", float, 0.1), ("grad_clip", float, 1.0),
                               ("skip_nonfinite", int, skip), ("log_every", int, 1), ("eval_every", int, 2),
                               ("seed", int, 0), ("wandb_mode", str, "disabled")])()
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    saved = []
    logger = tc.RunLogger(cfg, str(tmp_path / "run"), "toy")
    state = tc.LoopState()

    def step(i):
        return (w * losses[i]).sum(), {}, 1
    tc.run_training(cfg, optimizer=opt, params=[w], train_step=step, evaluate=lambda: {"m": 1.0},
                    save=lambda st, m, b: saved.append(st.step), state=state, logger=logger,
                    total_steps=len(losses))
    return state, saved


def test_metrics_log_restarts_with_a_new_run_and_resumes_at_the_checkpoint(tmp_path):
    cfg = make_dataclass("C", [("wandb_mode", str, "disabled")])()

    def rows(resumed_step, new_steps):
        logger = tc.RunLogger(cfg, str(tmp_path / "run"), "toy", resumed_step=resumed_step)
        for s in new_steps:
            logger.log("train", s, {"loss": 1.0})
        return [json.loads(l)["step"] for l in open(logger.path)]
    assert rows(0, [1, 2, 3]) == [1, 2, 3]
    assert rows(0, [1]) == [1]  # an overwritten run's log is not mixed into the new one
    assert rows(0, [1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]  # killed after step 5, its checkpoint at step 3:
    assert rows(3, [4, 5, 6]) == [1, 2, 3, 4, 5, 6]  # the resumed run logs 4 and 5 once more, not twice
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "ste')  # a row torn by the kill
    assert rows(6, [7]) == [1, 2, 3, 4, 5, 6, 7]


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(tc.NonFiniteLoss, match="last good checkpoint is kept"):
        _toy_loop(tmp_path, [1.0, 1.0, 1.0, float("nan"), 1.0, 1.0])
    state, saved = _toy_loop(tmp_path, [1.0, 1.0, 1.0, float("inf"), 1.0, 1.0], skip=2)
    assert state.skipped_nonfinite == 1 and state.step == 6 and saved == [2, 4, 6]


@pytest.mark.parametrize("module,cls,flag,value,expect", [
    (p1, p1.Phase1Config, "lr", "0", "must be > 0"),
    (p1, p1.Phase1Config, "num_codes", "1", "must be >= 2"),
    (p1, p1.Phase1Config, "window_size", "0", "must be >= 1"),
    (p1b, p1b.Phase1bConfig, "lora_rank", "0", "must be >= 1"),
    (p2, p2.Phase2Config, "temperature", "-0.1", "must be > 0"),
    (p2, p2.Phase2Config, "adapter_type", "triple", "invalid choice"),
    (p1, p1.Phase1Config, "preset", "huge", "unknown preset"),
])
def test_cli_rejects_impossible_values(module, cls, flag, value, expect, capsys):
    with pytest.raises(SystemExit) as e:
        tc.parse_config(cls, module.PRESETS, [f"--{flag}", value])
    assert e.value.code == 2
    assert expect in capsys.readouterr().err


def test_script_prints_one_line_for_wrong_checkpoint(tmp_path):
    bogus = tmp_path / "not_a_checkpoint.pt"
    bogus.write_bytes(b"hello")
    r = subprocess.run([sys.executable, "vqvae_phase2_train_adapters.py", "--checkpoint", str(bogus)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in r.stderr


def test_hub_unreachable_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "vqvae_phase1_train.py", "--preset", "tiny", "--data", "hub",
                        "--output", str(tmp_path / "x.pt")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not be loaded from the Hub" in r.stderr and "--data sample" in r.stderr


def test_weight_average_follows_live_weights_and_swaps_back():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    frozen = m.bias.requires_grad_(False)  # untrained tensors are not averaged
    w0 = m.weight.detach().clone()
    wa = tc.WeightAverage(m, 0.98)
    with torch.no_grad():
        m.weight.add_(1.0)
    wa.update()  # bias-corrected: the first update's average is those weights, not the initial ones
    assert torch.equal(wa.avg[0], w0 + 1)
    with torch.no_grad():
        m.weight.add_(1.0)
    wa.update()  # weights (w0 + 1) and (w0 + 2) with weights 0.98 and 1
    assert torch.allclose(wa.avg[0], (0.98 * (w0 + 1) + (w0 + 2)) / 1.98)
    live, average = m.weight.detach().clone(), wa.avg[0].clone()
    with pytest.raises(RuntimeError):
        with wa.applied():
            assert torch.equal(m.weight, average) and m.bias is frozen
            with wa.applied():  # nested: still the average, and the outer block still puts it back
                assert torch.equal(m.weight, average)
            assert torch.equal(m.weight, average)
            raise RuntimeError("boom")
    assert torch.equal(m.weight, live) and torch.equal(wa.avg[0], average)  # put back, also on error
    saved_live, saved_avg = wa.live_state(), [a.clone() for a in wa.avg]
    with torch.no_grad():  # resume: the model holds the average, the live weights come back in
        m.weight.copy_(saved_avg[0])
    again = tc.WeightAverage(m, 0.98)
    again.load_live_state(saved_live, updates=2)
    assert torch.equal(m.weight, live) and torch.equal(again.avg[0], saved_avg[0]) and again.updates == 2
    off = tc.WeightAverage(m, 0.0)
    off.update()
    with off.applied():
        assert torch.equal(m.weight, live)
    with pytest.raises(ValueError):
        tc.WeightAverage(m, 1.0)


def _tiny_phase1(tmp_path, teacher_cache_dir):
    import vqvae_phase1_train as p1
    ck1 = tmp_path / "p1.pt"
    p1.main(tc.parse_config(p1.Phase1Config, p1.PRESETS, ["--preset", "tiny", "--output", str(ck1),
                                                          "--teacher_cache", teacher_cache_dir]))
    return ck1


def _straight_then_killed_and_resumed(tmp_path, cmd, lo, hi, total):
    """Run `cmd` to the end once; run it again, kill -9 at a checkpoint with lo <= step < hi, resume it.
    -> (the resumed run's checkpoint, the uninterrupted run's)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = lambda out, *extra: subprocess.Popen([*cmd, "--output", str(out), *extra], cwd=REPO, env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    straight, killed = tmp_path / "straight.pt", tmp_path / "killed.pt"
    assert run(straight).wait(timeout=300) == 0
    proc = run(killed)
    deadline = time.time() + 240
    while time.time() < deadline:
        if killed.exists():
            try:
                if lo <= load_checkpoint(str(killed))["step"] < hi:
                    break
            except Exception:  # caught between its creation and the rename: look again
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(str(killed))["step"] < total
    assert run(killed, "--resume").wait(timeout=300) == 0
    a, b = load_checkpoint(str(killed)), load_checkpoint(str(straight))
    assert a["step"] == b["step"] == total
    return a, b


def test_phase2_kill_9_then_resume_gives_the_same_adapters(tmp_path, teacher_cache_dir):
    """Phase 2 killed mid-run and resumed ends with the very tensors of an uninterrupted run (optimizer,
    every RNG and the batcher's deferred pairs restored)."""
    ck1 = _tiny_phase1(tmp_path, teacher_cache_dir)
    cmd = [sys.executable, "vqvae_phase2_train_adapters.py", "--preset", "tiny", "--checkpoint", str(ck1),
           "--teacher_cache", teacher_cache_dir, "--max_steps", "400", "--eval_every", "5", "--eval_size", "16",
           "--train_pairs", "40", "--identity_weight", "1"]  # the identity penalty's sentences resume too
    a, b = _straight_then_killed_and_resumed(tmp_path, cmd, 20, 380, 400)
    assert a["resume"]["sentences_drawn"] == b["resume"]["sentences_drawn"] > 0
    for k in b["adapter_state_dict"]:  # equal up to float rounding: the resumed run encodes the frozen base's
        # texts in other batch shapes (its cache starts empty), which moves the last bits, never more
        assert torch.allclose(a["adapter_state_dict"][k], b["adapter_state_dict"][k], rtol=0, atol=2e-5), \
            (k, float((a["adapter_state_dict"][k] - b["adapter_state_dict"][k]).abs().max()))


def test_phase1b_codebook_grad_kill_9_then_resume_gives_the_same_tensors(tmp_path, teacher_cache_dir):
    """Phase 1b with a trained codebook, killed and resumed: LoRA, codebook and the quantiser's running
    state (centring mean, usage) equal an uninterrupted run's."""
    ck1 = _tiny_phase1(tmp_path, teacher_cache_dir)
    cmd = [sys.executable, "vqvae_phase1b_train_lora.py", "--preset", "tiny", "--phase1a_checkpoint", str(ck1),
           "--teacher_cache", teacher_cache_dir, "--max_steps", "120", "--eval_every", "4", "--codebook", "grad",
           "--train_windows", "64"]
    a, b = _straight_then_killed_and_resumed(tmp_path, cmd, 12, 100, 120)
    for part in ("lora_state_dict", "base_model_state_dict"):
        for k in b[part]:  # up to float rounding (batch shapes), as for Phase 2
            assert torch.allclose(a[part][k].float(), b[part][k].float(), rtol=0, atol=2e-5), (part, k)
