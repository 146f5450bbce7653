"""`metaunlearn demo`: the packaged study (configs/demo.yaml) on the built-in
digits world, end to end on a CPU: ESD-u with and without the meta objective,
two seeds, three attacks, and the report."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import load_config
from .study import Outcome, run_study


def run_demo(out: Path = Path("runs/demo"), overrides: tuple[str, ...] = (), progress: bool = True) -> Outcome:
    """Build (or reuse) the world, run (or resume) the demo study into `out`."""
    with resources.as_file(resources.files("metaunlearn") / "configs" / "demo.yaml") as path:
        config = load_config(path, overrides)
    # the folder set on the config, not as `--set` text a YAML parser would read
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(out)})})
    outcome = run_study(config, progress=progress)
    if outcome.report is not None:
        print(f"report: {outcome.report}  (and report.md, results.json beside it)")
    return outcome
