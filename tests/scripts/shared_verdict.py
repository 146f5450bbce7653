"""Run by tests/test_multiprocess.py under `accelerate launch` (2 CPU processes): each process's own
judge gives a verdict of its own (its process index), as sampling that differs by process would; every
process must take the main process's, and only the main process may judge. argv: out folder."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from metaunlearn.engine import leave
from metaunlearn.unlearn import main_process_judge, recorded_judge

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
calls = []


def own_verdict() -> float:
    calls.append(1)
    return float(accelerator.process_index) + 0.5 * len(calls)


judge, verdicts = recorded_judge(main_process_judge(own_verdict, accelerator), None)
seen = [judge(), judge()]
(out / f"verdicts-{accelerator.process_index}.json").write_text(json.dumps({"seen": seen, "recorded": verdicts,
                                                                             "judged": len(calls)}))
accelerator.wait_for_everyone()
leave(0)
