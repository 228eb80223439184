"""Stage 2 (minutes): the classifier end to end at the job's input size, from stage 1's head: warm-up then cosine
schedule, label smoothing, BatchNorm on its running statistics, store augmentation, part of the batches mixed with
CutMix, new heads at a higher learning rate. It gets ``finetune_share`` of the time left; NTS-Net the rest.
"""
from __future__ import annotations

import time

from .. import distributed
from ..fit import StagePlan


def run(run, classifier):
    """Returns the fine-tuned classifier (on the training device), or ``classifier`` when the stage does not run."""
    if not run.starts_stage("finetune"):
        return classifier
    cfg = run.cfg
    if classifier is None:
        classifier = run.classifier()
    # the rest: final evaluations, export; several processes all follow process 0's plan
    seconds = distributed.agree(max(0.0, run.left() * (cfg.finetune_share if "ntsnet" in run.stages else 0.9)), run.device)
    run.progress(stage="finetune", stage_seconds=round(seconds))
    model = run.on_device(classifier)
    run.remember_start("finetune", model, seconds, None, cfg.cutmix)
    plan = StagePlan("finetune", run.snap.train, run.size, seconds, run.stage_loss(model.config),
                     val=(run.val_arrays, run.val_labels), cutmix_share=cfg.cutmix)
    result = run.fit(model, plan)
    run.record(result.rows)
    run.finetune_speed = result.rows[-1]["images_per_s"] if result.rows else None
    if run.main:
        t_sizes = time.perf_counter()
        # stage 3 continues from the training size; the saved model answers at its best test size
        answering, acc, scores, sizes = run.answering_model(result.model, result.accuracy, result.trained)
        run.sizes_seconds = time.perf_counter() - t_sizes
        run.finish_stage("finetune", answering, acc, scores, result.trained, sizes)
    return result.model
