"""`xpsr infer` claims across machines: exclusive create by link(), owner records, leases, and a two-node loopback
run (torchrun, each "node" a different machine identity) killed part-way and finished by two independent
processes of two more machines sharing the output folder: every image written once, none lost."""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import REPO
from node_helpers import FAKE_INFER
from node_helpers import children as _children
from node_helpers import free_port as _free_port

from xpsr.data.images import save_png_atomic
from xpsr.distributed.owners import create_exclusive, fs_now, read_owner, this_owner
from xpsr.inference import claims

TINY = REPO / "configs" / "infer" / "tiny_cpu.yaml"
FOREIGN = {"host": "node-b", "boot": "another-boot", "pidns": 1, "pid": 4242, "start": 1}


def _race(folder: Path, names: list[str], queue) -> None:
    won = []
    for name in names:
        fd = create_exclusive(folder / name, this_owner())
        if fd is not None:
            won.append(name)
            os.close(fd)
    queue.put(won)


def test_exclusive_create_has_one_winner_per_name_and_names_its_owner(tmp_path):
    names = [f"c{i:03d}" for i in range(150)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path, names, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    won = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert sorted(sum(won, [])) == names  # every name won exactly once
    assert read_owner(tmp_path / names[0])["host"] == this_owner()["host"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".new")]


def test_claims_of_dead_processes_here_are_taken_at_once_those_of_other_machines_after_the_lease(tmp_path):
    target = tmp_path / "a.png"
    code = ("import os, sys; from pathlib import Path; from xpsr.inference.claims import try_claim; "
            "assert try_claim(Path(sys.argv[1])) is not None; os._exit(0)")  # ends holding the claim
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)
    assert claims.claim_path(target).is_file()
    fd = claims.try_claim(target)
    assert fd is not None and read_owner(claims.claim_path(target))["pid"] == os.getpid()
    claims.release_claim(fd, target)
    assert not claims.claim_path(target).exists()

    os.close(create_exclusive(claims.claim_path(target), FOREIGN))  # another machine: its pid means nothing here
    assert claims.try_claim(target) is None
    old = fs_now(tmp_path / claims.FOLDER_LOCK) - claims.LEASE_S - 5
    os.utime(claims.claim_path(target), (old, old))  # its owner stopped touching it: gone
    fd = claims.try_claim(target)
    assert fd is not None and read_owner(claims.claim_path(target))["pid"] == os.getpid()
    claims.release_claim(fd, target)


def test_a_taker_that_finds_another_takers_new_claim_puts_it_back(tmp_path):
    path = claims.claim_path(tmp_path / "a.png")
    os.close(create_exclusive(path, FOREIGN))
    judged = os.stat(path)  # stale, say; then another taker replaces it before we rename
    path.unlink()
    os.close(create_exclusive(path, this_owner()))
    fresh = os.stat(path)
    assert not claims._take_over(path, judged)
    assert os.stat(path).st_ino == fresh.st_ino and read_owner(path)["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert claims._take_over(path, fresh) and not path.exists()


def test_a_holder_keeps_its_claim_fresh(tmp_path):
    code = """
import os, sys, time
from pathlib import Path
from xpsr.inference import claims
claims.HEARTBEAT_S = 0.05
target = Path(sys.argv[1])
fd = claims.try_claim(target)
os.utime(claims.claim_path(target), (1000, 1000))
time.sleep(0.5)
print(os.stat(claims.claim_path(target)).st_mtime > 1000)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_a_session_is_alone_only_when_no_other_live_session_is_there(tmp_path):
    other = tmp_path / f"{claims.SESSION_PREFIX}other"
    os.close(create_exclusive(other, FOREIGN))
    os.close(create_exclusive(tmp_path / f"{claims.CLAIM_PREFIX}0123456789abcdef", FOREIGN))
    with claims.FolderSession(tmp_path, [tmp_path]) as session:
        assert not session.alone and session.cleaned == 0
    old = fs_now(tmp_path / claims.FOLDER_LOCK) - claims.LEASE_S - 5
    for p in tmp_path.glob(".tmp-*"):
        os.utime(p, (old, old))
    with claims.FolderSession(tmp_path, [tmp_path]) as session:
        assert session.alone and session.cleaned == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [claims.FOLDER_LOCK]


# ------------------------------------------------- two nodes on loopback, then two more machines, one kill

_WORKER = FAKE_INFER + """
import xpsr.distributed.owners as owners
import xpsr.inference.claims as claims
node = sys.argv[1] + os.environ.get("GROUP_RANK", "")
owners.machine = lambda: {"host": "node-" + node, "boot": "boot-" + node, "pidns": 0}  # each one another machine
claims.LEASE_S, claims.HEARTBEAT_S = 3.0, 0.2
def note(word, path):
    with open(sys.argv[2], "a") as f:
        f.write(f"{word} {node} {os.path.basename(str(path))}\\n")
install_fake_infer(note)
run_mod.run_inference(load_config(InferConfig, sys.argv[3], sys.argv[4:]))
"""


def test_two_nodes_share_an_output_folder_a_kill_and_two_more_machines_write_each_image_once(tmp_path):
    src, out, log, worker = tmp_path / "lr", tmp_path / "sr", tmp_path / "log.txt", tmp_path / "worker.py"
    rng = np.random.default_rng(0)
    for i in range(12):
        save_png_atomic(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), src / f"{i:02d}.png")
    worker.write_text(_WORKER)
    args = [str(log), str(TINY), f"input={src}", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = _free_port()
    nodes = [subprocess.Popen([str(Path(sys.executable).with_name("torchrun")), "--nnodes", "2", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1",
                               str(worker), "a", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    deadline = time.time() + 240
    while time.time() < deadline and nodes[1].poll() is None:
        if log.exists() and log.read_text().count("written a1 ") >= 2:
            break
        time.sleep(0.05)
    for pid in _children(nodes[1].pid):
        os.kill(pid, signal.SIGKILL)
    nodes[1].wait(timeout=120)
    while _children(nodes[0].pid) and time.time() < deadline:  # rank 0 finishes its share
        time.sleep(0.2)
    nodes[0].kill()  # its launcher would wait 300 s at torchrun's exit barrier for the dead node
    first = [p.communicate(timeout=60)[0] for p in nodes]
    assert nodes[1].returncode != 0 and "infer: 6 images" in first[0], first
    time.sleep(3.5)  # the killed node's claim ages past the workers' lease (3 s)

    rest = [subprocess.Popen([sys.executable, str(worker), name, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for name in ("b", "c")]  # two more machines
    outs = [p.communicate(timeout=300)[0] for p in rest]
    assert [p.returncode for p in rest] == [0, 0], outs
    lines = [line.split() for line in log.read_text().splitlines()]
    written = sorted(name for word, _, name in lines if word == "written")
    assert written == [f"{i:02d}.png" for i in range(12)], written  # every image once, none lost
    by_node = {node for word, node, _ in lines if word == "written"}
    assert {"a0", "a1"} <= by_node and by_node & {"b", "c"}
    started_a1 = {n for w, node, n in lines if w == "start" and node == "a1"}
    assert len(started_a1 - {n for w, node, n in lines if w == "written" and node == "a1"}) <= 1
    assert sorted(p.name for p in out.glob("*.png")) == written
