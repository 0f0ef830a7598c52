"""Kill -9 fault injection (xpsr/apps/faults, scripts/fault_injection.py): the checks catch what they must
(temp files, duplicate rows, torn lines, half-written images, damaged SQLite), and a CI-sized campaign
kills every stage at drawn instants, reruns it and finds its outputs equal to an uninterrupted run."""
import json
import sqlite3

import numpy as np
import pytest
from PIL import Image

from xpsr.apps.faults import STAGES, Settings, run_stage
from xpsr.apps.faults.campaign import Reference, plan
from xpsr.apps.faults.launch import Run, make_launcher, watch
from xpsr.apps.faults.outputs import Rules, compare, snapshot

RULES = Rules(volatile={"report.json": ("stats.seconds",)}, unique={"log.jsonl": ("step",), "db.sqlite": ("k",)})


def _outputs(folder, rows=(1, 2, 3), seconds=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(folder / "a.png")
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in rows))
    (folder / "report.json").write_text(json.dumps({"stats": {"seconds": seconds, "n": len(rows)}}))
    return folder


def _database(path, keys):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (k INTEGER, v TEXT)")
    for k in keys:  # one transaction per row: the page layout depends on the order
        db.execute("INSERT INTO t VALUES (?, ?)", (k, f"value {k}"))
        db.commit()
    db.close()


def test_same_outputs_compare_equal_whatever_the_volatile_fields(tmp_path):
    a = snapshot(_outputs(tmp_path / "a", seconds=1.0), RULES)
    b = snapshot(_outputs(tmp_path / "b", seconds=9.5), RULES)
    assert a.problems == [] and a.temp == [] and compare(a, b) == []
    c = snapshot(_outputs(tmp_path / "c", rows=(1, 2)), RULES)
    found = " ".join(compare(a, c))
    assert "log.jsonl" in found and "report.json" in found  # a lost row, and the report's count


def test_leftovers_duplicates_torn_lines_and_half_written_images_are_found(tmp_path):
    ref = snapshot(_outputs(tmp_path / "ref"), RULES)
    run = _outputs(tmp_path / "run", rows=(1, 2, 2, 3))
    (run / ".tmp-b1c2.png").write_bytes(b"partial")
    png = (run / "a.png").read_bytes()
    (run / "a.png").write_bytes(png[: len(png) // 2])
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4')  # a torn last line: fine right after a kill, not after a clean run
    killed = snapshot(run, RULES, after_kill=True)
    assert killed.temp == [".tmp-b1c2.png"]
    assert any("a.png: image does not decode" in p for p in killed.problems)
    assert any("1 duplicate rows" in p and "step=2" in p for p in killed.problems)
    assert not any("cut off" in p for p in killed.problems)
    final = compare(ref, snapshot(run, RULES))
    assert any(p.startswith("temporary files left") for p in final)
    assert any("last line is cut off" in p for p in final)
    assert any(p.startswith("a.png: differs") for p in final)


def test_sqlite_is_compared_by_rows_and_its_integrity_checked(tmp_path):
    for name, keys in (("a", [1, 2, 3]), ("b", [3, 1, 2]), ("c", [1, 2, 2, 3])):
        (tmp_path / name).mkdir()
        _database(tmp_path / name / "db.sqlite", keys)
    a, b, c = (snapshot(tmp_path / n, RULES) for n in "abc")
    assert a.problems == [] and compare(a, b) == []  # same rows written in another order
    assert any("duplicate rows" in p for p in c.problems) and compare(a, c)
    data = bytearray((tmp_path / "a" / "db.sqlite").read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # the second half of the pages lost
    (tmp_path / "a" / "db.sqlite").write_bytes(bytes(data))
    damaged = snapshot(tmp_path / "a", RULES)
    assert any("integrity_check" in p or "not a readable SQLite" in p for p in damaged.problems)


def test_kill_plans_are_drawn_from_the_seed_and_cover_the_run():
    ref = Reference(seconds=10.0, first_write_s=4.0, writes=50, snapshot=None)
    settings = Settings(workdir=None, kills=30, work_kills=30, write_kills=30, seed=3)
    plans = [plan(settings, "train", i, ref) for i in range(90)]
    assert plans == [plan(settings, "train", i, ref) for i in range(90)]
    assert plans != [plan(Settings(workdir=None, kills=30, work_kills=30, write_kills=30, seed=4), "train", i, ref)
                     for i in range(90)]
    uniform = [k.value for p in plans[:30] for k in p]
    work = [k.value for p in plans[30:60] for k in p]
    writes = [k.value for p in plans[60:] for k in p]
    assert min(uniform) < 2.0 and max(uniform) > 8.0 and all(0 <= v < 10 for v in uniform)
    assert all(4.0 <= v < 10 for v in work) and all(1 <= v <= 50 and v == int(v) for v in writes)
    assert any(len(p) > 1 for p in plans) and all(len(p) <= settings.max_chain for p in plans)


def test_a_kill_that_finds_the_work_done_is_a_miss(tmp_path):
    """torchrun reports a clean end (exit 0) when the rank we SIGKILL was already past its work; such a kill
    interrupted nothing and must be drawn again, not counted (CI once counted one and found no failure report)."""
    def fake(rc_after_kill):
        state = {"rc": None}

        def kill():  # as kill_one_rank: the launcher's exit code says whether the rank was still working
            state["rc"] = rc_after_kill
            return rc_after_kill != 0
        return Run(0, lambda: state["rc"], kill, lambda timeout=None: state["rc"])

    assert not watch(fake(0), tmp_path, kill_at_s=0.0).killed
    killed = watch(fake(-9), tmp_path, kill_at_s=0.0)
    assert killed.killed and killed.rc == -9


# the CI-sized campaign: every stage, three trials (one per kill mode), the run forked from a server that
# imported the stages once so that kills land in the work; training and inference made shorter
CI_OVERRIDES = {"train": ["max_steps=3"], "infer": ["num_inference_steps=2"], "video": ["num_inference_steps=2"]}


@pytest.fixture(scope="module")
def launcher():
    launcher = make_launcher("forkserver")
    yield launcher
    launcher.close()


@pytest.mark.parametrize("stage", [name for name, stage in STAGES.items() if stage.processes == 1])
def test_a_killed_stage_rerun_to_completion_equals_an_uninterrupted_run(stage, tmp_path, launcher):
    settings = Settings(workdir=tmp_path, kills=1, work_kills=1, write_kills=1, seed=0, launcher="forkserver",
                        control=False, overrides=CI_OVERRIDES)
    report = run_stage(stage, settings, launcher)
    assert report["kills_total"] >= 3 and report["trials_without_kill"] == 0, report["records"]
    problems = [p for f in report["failures"] for p in f["problems"]]
    assert report["crashes"] == 0 and problems == [], problems
    if stage == "train":  # a rerun resumed from a checkpoint of the killed run, not from scratch
        assert report["resumed_at_steps"], report["records"]


def test_a_rank_killed_mid_run_stops_the_job_and_resume_ends_bitwise_equal(tmp_path):
    """train-ddp: torchrun, 2 CPU ranks; one rank gets SIGKILL inside the work; torchrun must end the job by
    itself (the other rank would otherwise wait in an all-reduce forever), and `resume=latest` on 2 processes
    must end with checkpoints and final weights equal bit for bit to the uninterrupted 2-process run."""
    settings = Settings(workdir=tmp_path, kills=0, work_kills=1, write_kills=0, seed=0, launcher="subprocess",
                        control=False, chain_prob=0.0, overrides={"train-ddp": ["max_steps=3"]})
    report = run_stage("train-ddp", settings, make_launcher("subprocess"))
    problems = [p for f in report["failures"] for p in f["problems"]]
    assert report["kills_total"] == 1 and report["crashes"] == 0 and problems == [], report["records"]
    killed = (tmp_path / "train-ddp" / "logs" / "trial-000-run-0.log").read_text(errors="replace")
    assert "did not stop the job" not in killed
    assert "exitcode  : -9" in killed or "Signal 9" in killed, killed[-2000:]  # torchrun's own failure report
    assert report["resumed_at_steps"], report["records"]


def test_eval_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The fix for what the campaign found in eval (a kill mid-write left an empty summary.json)."""
    from pathlib import Path

    from xpsr.metrics.evaluate import write_text_atomic

    target = tmp_path / "summary.json"
    target.write_text('{"psnr": 1.0}')
    real_write = Path.write_text

    def torn_write(self, text, *args, **kwargs):  # half the text reaches the disk, then the process "dies"
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("killed mid-write")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError, match="killed mid-write"):
        write_text_atomic(target, '{"psnr": 2.0, "ssim": 0.5}')
    monkeypatch.undo()
    assert target.read_text() == '{"psnr": 1.0}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    write_text_atomic(target, '{"psnr": 2.0}')
    assert json.loads(target.read_text()) == {"psnr": 2.0} and len(list(tmp_path.iterdir())) == 1
