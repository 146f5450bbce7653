"""Run by tests/test_multiprocess.py under `accelerate launch` (2 CPU processes): each process's own
judge gives a verdict of its own (its process index), as sampling that differs by process would; every
process must take the main process's, and only the main process may judge. argv: out folder, mode:
own (as above), replay (the main process replays a verdict of an interrupted run, which the other
process never read), fail (the main process's judge raises: every process must stop, none wait)."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from metaunlearn.engine import leave
from metaunlearn.errors import ConfigError
from metaunlearn.unlearn import shared_judge

out, mode = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True)
calls = []


def own_verdict() -> float:
    calls.append(1)
    if mode == "fail":
        raise ConfigError("no detector for this concept")
    return float(accelerator.process_index) + 0.5 * len(calls)


replay = [7.0] if mode == "replay" and accelerator.is_main_process else None
shared, verdicts = shared_judge(own_verdict, replay, accelerator)  # as unlearn() pairs them
try:
    seen = [shared(), shared()]
except Exception as error:  # as the CLI: a one-line error and a non-zero exit
    (out / f"error-{accelerator.process_index}.txt").write_text(f"{type(error).__name__}: {error}")
    leave(1)
(out / f"verdicts-{accelerator.process_index}.json").write_text(json.dumps({"seen": seen, "recorded": verdicts,
                                                                             "judged": len(calls)}))
accelerator.wait_for_everyone()
leave(0)
