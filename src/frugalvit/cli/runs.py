"""Run directories of the training commands: their recorded settings, checked before a run resumes.

A command that trains (`dvt train`, `ecoformer finetune`) resumes from the
checkpoints in its output directory. Resuming with other settings or data
would hand back the earlier run's models under the new run's name, so the
settings are recorded beside them and compared first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from frugalvit.cli.options import device_report, training_precision
from frugalvit.ioutil import read_json, write_json_atomically


def start_run(run: Path, record: dict[str, Any], device: torch.device, amp_dtype: torch.dtype | None,
              name: str = "config.json") -> None:
    """Create the run directory with its settings (`record`, JSON-able) in `name`, or check that an existing one
    holds the same (resume). Where it ran is recorded too but not compared: a run may resume on another device or
    in another precision."""
    config_path = run / name
    if config_path.is_file():
        previous = read_json(config_path, f"delete {run} to start over")
        previous.pop("device", None)
        if previous != json.loads(json.dumps(record)):
            raise ValueError(f"{run} holds a run with different settings; use a new --out, or the same options "
                             f"to resume it")
        print(f"resuming {run}")
    run.mkdir(parents=True, exist_ok=True)
    # where (this invocation of) the training ran: mixed precision keeps float32 weights
    write_json_atomically(record | {"device": device_report(device, amp_dtype)
                                    | {"precision": training_precision(amp_dtype)}}, config_path)
