"""The ServerApp: validate the run config, build the strategy, run it, write the run folder."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import parse_run_config
from common.data import load_dataset
from common.runfolder import RunLock, clear_outputs, refuse_results, trained_rounds, write_status
from server_app.checkpoint import check_resume, load_checkpoint
from server_app.outputs import RunRecorder, resolve_run_dir
from server_app.progress import tee_output
from server_app.registry import build_strategy

app = ServerApp()
log = logging.getLogger("progfl")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point: the run config is validated before anything trains.

    Output is also copied to ``$PROGFL_PROGRESS_FILE`` when set (``run.sh``'s quiet simulations
    follow that file instead of a ``flwr run --stream`` process; :mod:`server_app.progress`).
    """
    with tee_output():
        _run(grid, context)


def _run(grid: Grid, context: Context) -> None:
    cfg = parse_run_config(context.run_config)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[progfl] %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if cfg.verbose else logging.WARNING)
    if cfg.server_threads:
        from common.training import set_torch_threads

        set_torch_threads(cfg.server_threads)
    dataset = load_dataset(cfg.data_spec())
    run_dir = resolve_run_dir(cfg)
    with RunLock(run_dir) as lock:  # one writer per run folder (common.runfolder)
        if lock.took_over:
            print(f"[progfl] {run_dir}: took over the lock of PID {lock.took_over}, which is no longer running")
        checkpoint = None
        if cfg.resume:  # validated before anything in the run folder is touched
            checkpoint = load_checkpoint(run_dir)
            check_resume(checkpoint, cfg)
            print(f"[progfl] resuming {run_dir} after round {checkpoint.round}", flush=True)
        else:
            refuse_results(run_dir, cfg.overwrite)
            if cfg.overwrite and (removed := clear_outputs(run_dir)):
                print(f"[progfl] overwrite=true: removed {', '.join(removed)} of an earlier run in {run_dir}")
        recorder = RunRecorder(cfg, run_dir)
        print(f"[progfl] run folder: {run_dir}", flush=True)
        strategy = build_strategy(cfg, recorder, dataset.num_classes)
        try:
            strategy.start(grid, checkpoint=checkpoint)
        except BaseException as exc:
            done = trained_rounds(run_dir)
            write_status(run_dir, "failed", reason=f"{type(exc).__name__}: {exc}", **{"rounds-completed": done})
            raise
        write_status(run_dir, "finished", **{"rounds-completed": trained_rounds(run_dir)})
    s = recorder.summary
    print(
        f"[progfl] done: final accuracy {100 * s['final-accuracy']:.2f}% (best {100 * s['best-accuracy']:.2f}%), "
        f"participation {100 * s['participation-rate']:.0f}%, results in {run_dir}",
        flush=True,
    )
