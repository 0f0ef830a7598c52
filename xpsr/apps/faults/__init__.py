"""Fault injection: kill a stage with SIGKILL at random instants, rerun it, prove nothing was lost.

``python scripts/fault_injection.py --stages prepare,caption,infer,eval,train --kills 20 --workdir DIR``
runs, for each stage on small inputs with the tiny model, an uninterrupted reference run, then trials
that kill the stage (at a random instant, inside its work, or right at an output write; sometimes again
in the rerun), rerun it to completion and check that the outputs equal the reference: the same bytes
(SQLite by rows), no temporary files, no duplicate rows, an intact database; for training, checkpoints
and final weights bit for bit. See ``campaign.py`` for the procedure and ``outputs.py`` for the checks.
"""
from xpsr.apps.faults.campaign import Settings, run_stage
from xpsr.apps.faults.report import run_campaign
from xpsr.apps.faults.stages import STAGES

__all__ = ["STAGES", "Settings", "run_campaign", "run_stage"]
