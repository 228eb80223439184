"""Stage 4, the refit (small catalogues): the winning end-to-end stage trained again from the same starting weights,
for the same time, on the training and validation photos. Having seen the validation photos it can only be measured
on the test photos, against the winner (ProgressiveRun.finish_refit).
"""
from __future__ import annotations

from ntsnet import create_model

from .. import distributed
from ..answers import at_input_size
from ..data import Snapshot
from ..features import load_arrays
from ..fit import StagePlan
from ..progressive import REFIT_MAX_PHOTOS, STAGES


def refit_wanted(cfg, snap: Snapshot) -> tuple[bool, str]:
    """Whether to train the winning stage again on training + validation photos, and why (not)."""
    if cfg.refit == "off":
        return False, "refit off"
    if not snap.val or not snap.test:
        return False, "no refit: it needs validation photos to add and test photos to measure it on"
    if cfg.refit == "auto" and len(snap.train) + len(snap.val) > REFIT_MAX_PHOTOS:
        return False, f"no refit: more than {REFIT_MAX_PHOTOS} photos, the validation photos would add little"
    return True, f"refit on {len(snap.train)} training + {len(snap.val)} validation photos, measured on {len(snap.test)} test photos"


def run(run) -> None:
    wanted, why = refit_wanted(run.cfg, run.snap)
    if run.main and run.winner is not None:
        run.log(why)
    chosen = run.main and run.winner and wanted and not run.stop
    refit_of = int(distributed.agree(STAGES.index(run.winner["stage"]) if chosen else 0, run.device))
    if not refit_of or run.stop:
        return
    stage = STAGES[refit_of]
    start_state, seconds, config, head_lr_mult, cutmix_share = run.starts[stage]
    model = create_model(config, pretrained=False)
    if run.main:  # the others get process 0's weights from DDP
        model.load_state_dict(start_state)
    model = run.on_device(model)
    run.budget += seconds  # the ETA counts it
    run.files.progress["stages"] = run.stages + ["refit"]
    run.progress(stage="refit", stage_seconds=round(seconds), refit_of=stage)
    plan = StagePlan("refit", run.snap.train + run.snap.val, config.input_size, seconds, run.stage_loss(config), val=None,
                     head_lr_mult=head_lr_mult, cutmix_share=cutmix_share)
    result = run.fit(model, plan)
    run.record(result.rows)
    if run.main and not run.stop:
        winner = run.winner["model"].config
        test_arrays, test_labels = load_arrays(run.snap.test)
        run.finish_refit(at_input_size(result.model, winner.input_size, winner.answer), stage, test_arrays, test_labels)
