"""scripts/infer_load.py at CI size: two real `xpsr infer` processes (tiny model, CPU) share a folder of 20 images,
one is killed with SIGKILL half way and a replacement joins; every image is written once, the kill costs at most
the image in flight, and a last run alone redoes nothing and leaves no temp or claim file."""
import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("infer_load", REPO / "scripts" / "infer_load.py")
infer_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infer_load)


def test_two_processes_and_a_kill_write_every_image_once(tmp_path):
    result = infer_load.run_load(tmp_path, images=20, size=16, processes=2, kill_at=0.5, steps=1, pause=0.1,
                                 timeout=600)
    assert result["written_once"], (result["duplicates"], result["missing"])
    assert len(result["lost_in_kill"]) <= 1
    roles = {p["role"]: p["written"] for p in result["per_process"].values()}
    assert set(roles) == {"killed", "worker", "replacement"} and sum(roles.values()) == 20
    assert result["final_pass"] == {"done": 0, "skipped_existing": 20, "failed": 0, "temp_files_left": []}
