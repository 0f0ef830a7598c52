"""Training on 2 processes (gloo on CPU), launched as the docs tell users: every recipe runs, the
mathematics equal one process, each pair is dealt once, only the main process writes run files,
a 2-process checkpoint resumes on 1 process, and two "nodes" on loopback equal one node.

One module-scoped `accelerate launch` runs all 2-process jobs in sequence (tests/ddp_jobs.py), so the
launcher and the imports are paid once.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from xpsr.config import TrainConfig, load_config
from xpsr.training.loop import run_training

RECIPES = sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml"))
ACCELERATE_2CPU = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
TINY = ["model.base=tiny", "model.conditioning_channels=[8,16,16,32]", "data.crop_size=64", "batch_size=1",
        "gradient_accumulation_steps=1", "device=cpu", "mixed_precision=fp32", "frozen_unet_dtype=fp32",
        "num_workers=0", "report_to=none", "validation.every=0", "checkpoint_every=0", "use_8bit_adam=false",
        "demo_data=false", "log_every=1", "max_steps=2",
        "data.latent_cache=null"]  # the 12 GB recipe reads cached HR latents; tests/test_memory.py covers them
ONESTEP = ["onestep.teacher=null", "onestep.lpips_weight=0",
           f"onestep.teacher_infer_config={REPO / 'configs' / 'infer' / 'onestep_tiny_teacher.yaml'}"]
# the reference 2-process run: also the one whose run files are counted, and the one resumed on 1 process
REFERENCE = ["max_steps=3", "checkpoint_every=1", "checkpoints_total_limit=null", "use_ema=true",
             "ema_decay=0.5", "report_to=tensorboard", "validation.every=3", "validation.num_images=1",
             "validation.num_inference_steps=2"]
EQUIVALENCE = ["max_steps=1", "lr_scheduler=constant", "learning_rate=1e-3"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_overrides(demo) -> list[str]:
    return [f"data.pairs=[{demo.pairs[0]}]", f"data.cache={demo.cache}"]


def recipe_overrides(name: str, demo, out, *extra) -> list[str]:
    onestep = "onestep" in (REPO / "configs" / "train" / name).read_text()
    return TINY + data_overrides(demo) + (ONESTEP if onestep else []) + [f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xpsr.training.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), crop_size=64)


@pytest.fixture(scope="module")
def two_process_runs(demo, tmp_path_factory):
    """Every recipe for 2 steps, the reference run and the equivalence run: one launch, 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    tiny = str(REPO / "configs" / "train" / "tiny.yaml")
    jobs = [{"config": str(REPO / "configs" / "train" / name), "overrides": recipe_overrides(name, demo, root / name)}
            for name in RECIPES]
    jobs.append({"config": tiny, "overrides": recipe_overrides("tiny.yaml", demo, root / "reference", *REFERENCE)})
    jobs.append({"config": tiny, "overrides": recipe_overrides("tiny.yaml", demo, root / "eq-2x1", *EQUIVALENCE)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2CPU),
                           "--main_process_port", str(port), str(REPO / "tests" / "ddp_jobs.py"),
                           str(root / "jobs.json")], capture_output=True, text=True, env=env(), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc.stdout + proc.stderr


def trained(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "trained.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_on_two_processes(two_process_runs, name):
    root, log = two_process_runs
    for rank in (0, 1):
        assert f"job done [rank {rank}/2]: {REPO / 'configs' / 'train' / name} 2 steps" in log
    assert (root / name / "final" / "trained.safetensors").is_file()
    rows = [json.loads(line) for line in (root / name / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_two_ranks_batch_1_equal_one_rank_batch_2_and_accumulation(two_process_runs, demo, tmp_path):
    """Same two samples (global stream positions 0 and 1), one AdamW step, fp32. Aligned, not loosened: the
    per-sample random streams (VAE posterior noise, diffusion noise, timestep: seeded by (seed, stream
    position)) and the data randomness (crop, flip, HR-as-condition, prompt dropout: seeded by the sample
    key) are the same on every layout, so only the order of float additions differs (the mean over 2 samples
    vs the all-reduce average of 2 means of 1, or 2 accumulated halves).

    Tolerance: lr x 5e-2 per weight. AdamW's first step moves a weight by lr x g/(|g| + eps): for the few
    weights whose gradient is a near-zero sum of larger terms, a different float32 summation order changes
    g/(|g| + eps) by about 1e-2 (measured 5.8e-3 x lr, and 1.15e-2 x lr after unrelated changes to the model's
    forward moved which weights sit near zero). Other mathematics (different samples or noise, a sum instead
    of a mean) moves weights by O(lr): the control below differs by 2 lr, 40 times the tolerance."""
    root, _ = two_process_runs
    tiny = REPO / "configs" / "train" / "tiny.yaml"
    runs = {"1x2": ["batch_size=2"], "1x1x2": ["batch_size=1", "gradient_accumulation_steps=2"],
            "control-other-crops": ["batch_size=2", "data.seed=1"]}
    for name, extra in runs.items():
        run_training(load_config(TrainConfig, tiny, recipe_overrides("tiny.yaml", demo, tmp_path / name,
                                                                      *EQUIVALENCE, *extra)))
    ddp, lr = trained(root / "eq-2x1"), 1e-3
    diffs = {name: max_difference(ddp, trained(tmp_path / name)) for name in runs}
    print("2 ranks x batch 1 vs: " + ", ".join(f"{k}: max |dw| = {v / lr:.2g} lr" for k, v in diffs.items()))
    assert diffs["1x2"] <= lr * 5e-2 and diffs["1x1x2"] <= lr * 5e-2, diffs
    assert diffs["control-other-crops"] > lr / 2, "the comparison cannot tell other mathematics apart"


def test_only_the_main_process_writes_run_files(two_process_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = two_process_runs[0] / "reference"
    rows = [json.loads(line) for line in (run / "logs" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    assert [p.name for p in (run / "samples").iterdir()] == ["step-3.png"]
    # events.out.tfevents.TIME.HOST.PID.N: TensorBoard's writers (scalars, and the hparams in a subfolder) of
    # ONE process, and each loss event once
    events = list((run / "logs").rglob("events.out.tfevents*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1, events
    acc = EventAccumulator(str(run / "logs" / "xpsr"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]


def test_a_two_process_checkpoint_resumes_on_one_process_exactly(two_process_runs, demo, tmp_path):
    """Saved by 2 ranks x batch 1 at step 2 (global stream position 4), resumed on 1 rank x batch 2: the same
    samples with the same noise, so step 3 equals the 2-process run's (within the equivalence tolerance)."""
    import shutil

    root, _ = two_process_runs
    run = tmp_path / "resumed"
    shutil.copytree(root / "reference" / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "tiny.yaml",
                      recipe_overrides("tiny.yaml", demo, run, *REFERENCE, "batch_size=2", "report_to=none",
                                       "validation.every=0", "resume=latest"))
    run_training(cfg)
    state = json.loads((run / "checkpoints" / "step-3" / "state.json").read_text())
    assert (state["world"], state["samples"], state["global_batch"]) == (1, 6, 2)
    assert max_difference(trained(run), trained(root / "reference")) <= 1e-4 * 1e-2  # lr x 1e-2, as above


def test_world_size_change_messages():
    from xpsr.distributed.world import WorldSizeError, describe_change, rescale_position

    assert rescale_position(3, 2, 1, "ckpt") == 6 and rescale_position(4, 8, 4, "ckpt") == 8
    assert rescale_position(5, None, 2, "ckpt") == 5  # older checkpoints: taken as the same world size
    with pytest.raises(WorldSizeError, match="ckpt: saved by 2 processes at global data position 6.*4 processes"):
        rescale_position(3, 2, 4, "ckpt")
    assert describe_change(2, 4, 2, 4) is None
    assert "global batch changes from 4 to 2" in describe_change(2, 4, 1, 2)


def test_each_position_of_the_data_stream_goes_to_exactly_one_rank(demo):
    """Sampling is with replacement by folder weight (an endless stream, as the official loader's random
    sampler); across W ranks the stream is dealt round robin, so W ranks x m samples consume exactly the
    first W x m draws of the 1-rank stream, each once: no padding, nothing dropped or repeated."""
    import itertools

    from xpsr.distributed.streams import PositionedSampler
    from xpsr.training.dataset import build_dataset

    n = 12
    one = [k for k in itertools.islice(PositionedSampler(build_dataset(demo, 0, 1)[1]), 3 * n)]
    for world in (2, 3):
        dealt = []
        for rank in range(world):
            dealt += list(itertools.islice(PositionedSampler(build_dataset(demo, rank, world)[1]), 3 * n // world))
        assert sorted(dealt, key=lambda k: k[2]) == one
    # resuming rank r of W at `start` continues its own share
    resumed = list(itertools.islice(PositionedSampler(build_dataset(demo, 1, 2, start=4)[1]), 2))
    assert [k[2] for k in resumed] == [9, 11]


def torchrun(nnodes: int, node_rank: int, port: int, nproc: int = 1) -> list[str]:
    """The launch line of one node (docs/scaling-out.md), rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(REPO / "scripts" / "train.py")]


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(two_process_runs, demo, tmp_path):
    """Two torchrun launches (--nnodes 2, node_rank 0|1, 1 CPU process each) train the reference recipe:
    the same ranks, the same gloo all-reduce, so the final weights are bitwise those of 1 node x 2 processes."""
    root, _ = two_process_runs
    run, port = tmp_path / "two-nodes", free_port()
    args = ["--config", str(REPO / "configs" / "train" / "tiny.yaml"),
            *recipe_overrides("tiny.yaml", demo, run, *REFERENCE, "report_to=none", "validation.every=0")]
    nodes = [subprocess.Popen(torchrun(2, rank, port) + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env()) for rank in (0, 1)]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    a, b = trained(run), trained(root / "reference")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fsdp_runs(demo, tmp_path_factory):
    """FSDP2 on 2 CPU processes, one launch: the reference recipe straight, and the same split in two
    sessions (stop_at_step=2, then resume=latest)."""
    root = tmp_path_factory.mktemp("fsdp")
    tiny = str(REPO / "configs" / "train" / "tiny.yaml")
    fsdp = [*REFERENCE, "report_to=none", "validation.every=0", "checkpoint_every=0"]
    jobs = [{"config": tiny, "overrides": recipe_overrides("tiny.yaml", demo, root / "straight", *fsdp)},
            {"config": tiny, "overrides": recipe_overrides("tiny.yaml", demo, root / "split", *fsdp, "stop_at_step=2")},
            {"config": tiny, "overrides": recipe_overrides("tiny.yaml", demo, root / "split", *fsdp, "resume=latest")}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / "fsdp2_cpu_2proc.yaml"), "--main_process_port",
                           str(free_port()), str(REPO / "tests" / "ddp_jobs.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, env=env(), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc.stdout + proc.stderr


def test_fsdp_trains_like_ddp_and_resumes_into_ordinary_files(fsdp_runs, two_process_runs):
    """FSDP2 (fully_shard, gloo) shards the pair; after 3 AdamW steps its weights and EMA equal DDP's within
    lr x 1e-2 per weight (FSDP averages gradients by reduce-scatter, DDP by all-reduce: another summation
    order, see the equivalence test). A run stopped at step 2 and resumed under FSDP ends bitwise equal to the
    straight one, and its final weights are our ordinary file, loaded by one process with strict key checks."""
    from xpsr.models.build import build_xpsr
    from xpsr.models.checkpoint import load_trained

    root, log = fsdp_runs
    assert "resumed from" in log and "at step 2" in log
    straight, split, ddp = root / "straight", root / "split", two_process_runs[0] / "reference"
    lr = 1e-4
    for name in ("trained", "ema"):
        a, b = load_file(str(straight / "final" / f"{name}.safetensors")), load_file(str(ddp / "final" /
                                                                                          f"{name}.safetensors"))
        diff = max_difference(a, b)
        print(f"FSDP vs DDP after 3 steps, {name}: max |dw| = {diff / lr:.2g} lr")
        assert diff <= lr * 1e-2, (name, diff)
        c = load_file(str(split / "final" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a), f"{name}: the resumed FSDP run differs"
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "tiny.yaml", ["output_dir=x", "model.base=tiny"])
    modules = build_xpsr(cfg.model)
    load_trained(straight / "final" / "trained.safetensors", modules.unet, modules.controlnet)


def test_fsdp_on_cpu_refuses_validation_and_fsdp1(monkeypatch, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from xpsr.errors import XPSRError
    from xpsr.training.loop import setup_accelerator

    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "tiny.yaml", [f"output_dir={tmp_path}",
                                                                             "demo_data=false"])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests of this session made one already
    GradientState._reset_state()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for env_vars, message in (({"FSDP_VERSION": "2"}, "validation.every must be 0"),
                              ({"FSDP_VERSION": "1"}, "only fsdp_version: 2")):
        for k, v in {**env_vars, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(XPSRError, match=message):
            setup_accelerator(cfg)
        torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_and_start_several_processes(path):
    """accelerate reads each file; each asks for several processes through torchrun (MULTI_GPU or FSDP: a
    MULTI_CPU file would start one process without mpirun), FSDP files for FSDP version 2."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes > 1 and cfg.distributed_type.value in ("MULTI_GPU", "FSDP")
    assert cfg.use_cpu == ("cpu" in path.name)
    if cfg.distributed_type.value == "FSDP":
        assert str(cfg.fsdp_config["fsdp_version"]) == "2"
