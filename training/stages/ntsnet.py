"""Stage 3: NTS-Net warm-started from stage 2, so its first prediction equals stage 2's at the same input size (the
Teacher and whole-image heads and the whole-image slice of the Scrutinizer take the fine-tuned head, the part
slices start at zero), then trained with L_I + L_S + L_C. 448/224 px on a GPU; on a CPU 9/7 of stage 2's size when
the time left allows it about two epochs there (``ntsnet_input_size``), else stage 2's size.
"""
from __future__ import annotations

import torch

from ntsnet import NTSConfig, create_model

from .. import distributed
from ..answers import at_input_size, candidate_sizes
from ..fit import StagePlan

NTSNET_COST = 3.0            # NTS-Net (K=4 parts at half the size) per photo, in classifier photos at the same size
LARGER_MIN_EPOCHS = 2.0      # what NTS-Net needs at a size its start was not trained at before it pays
LARGER_MIN_PHOTOS = 5000


def ntsnet_from_classifier(classifier, config: NTSConfig):
    """An NTS-Net whose first prediction equals ``classifier``'s at the same input size: same backbone, the
    classifier's head as raw and Teacher head and as the whole-image slice of the Scrutinizer, part slices 0."""
    model = create_model(config, pretrained=False)
    model.backbone.load_state_dict(classifier.backbone.state_dict())
    c = classifier.raw_head.in_features
    with torch.no_grad():
        for head in (model.raw_head, model.teacher_head):
            head.load_state_dict(classifier.raw_head.state_dict())
        model.scrutinizer_head.weight.zero_()
        model.scrutinizer_head.weight[:, config.cat_num * c:] = classifier.raw_head.weight
        model.scrutinizer_head.bias.copy_(classifier.raw_head.bias)
    return model


def ntsnet_input_size(train_size: int, seconds_at, classifier_speed: float | None, n_train: int, on_gpu: bool = False) -> tuple[int, str]:
    """Stage 3's input size and why. NTS-Net may train at 9/7 of stage 2's ``train_size`` (224 -> 288 px, parts 144)
    when the time left is enough for it to adapt: at least LARGER_MIN_EPOCHS epochs and LARGER_MIN_PHOTOS photos at
    the speed stage 2 measured (``classifier_speed``, photos/s) scaled by NTS-Net's cost and the pixels.
    ``seconds_at(size)``: stage 3's seconds if it trains at ``size``. A GPU trains the paper's 448 px in both stages
    already; without a measured speed (no stage 2) the size stays."""
    if on_gpu or not classifier_speed:
        return train_size, f"{train_size} px, stage 2's size"
    larger = max(candidate_sizes(train_size))  # the largest size stage 2's weights are measured at
    seconds = seconds_at(larger)
    photos = classifier_speed / NTSNET_COST * (train_size / larger) ** 2 * seconds
    needed = max(LARGER_MIN_EPOCHS * n_train, LARGER_MIN_PHOTOS)
    why = (f"about {photos:.0f} photos at {larger} px in {seconds:.0f} s at the {classifier_speed:.1f} photos/s stage 2 "
           f"measured, {needed:.0f} needed")
    return (larger, f"{larger} px: {why}") if photos >= needed else (train_size, f"{train_size} px, stage 2's size: {why}")


def run(run, classifier) -> None:
    if not run.starts_stage("ntsnet"):
        return
    cfg = run.cfg
    # time kept for its test sizes: NTS-Net costs about twice the classifier (K parts at half the size), more pixels more
    seconds_at = lambda s: max(0.0, run.left() * 0.9 - 2 * run.sizes_seconds * (s / run.size) ** 2)  # noqa: E731
    if cfg.ntsnet_size:
        size, why = cfg.ntsnet_size, f"{cfg.ntsnet_size} px, asked for"
    else:
        size, why = ntsnet_input_size(run.size, seconds_at, run.finetune_speed, len(run.snap.train), on_gpu=run.device.type == "cuda")
    size = int(distributed.agree(size, run.device))
    run.log(f"ntsnet: trains at {why}")
    config = NTSConfig(model="ntsnet", backbone=cfg.backbone, num_classes=run.n_cls, input_size=size, part_size=max(32, size // 2),
                       proposal_num=cfg.proposal_num, cat_num=cfg.cat_num)
    if classifier is None:
        classifier = run.classifier()
    # at another size than stage 2's its first prediction is stage 2's classifier answering at that size
    model = run.on_device(ntsnet_from_classifier(at_input_size(classifier, size), config))
    seconds = distributed.agree(seconds_at(size), run.device)
    run.progress(stage="ntsnet", stage_seconds=round(seconds))
    # the heads continue stage 2's (not new layers); the Navigator at a high rate lets the ranking loss diverge
    run.remember_start("ntsnet", model, seconds, 1.0, 0.0)
    plan = StagePlan("ntsnet", run.snap.train, size, seconds, run.stage_loss(config), val=(run.val_arrays, run.val_labels),
                     head_lr_mult=1.0)
    result = run.fit(model, plan)
    run.record(result.rows)
    if run.main:
        model, acc, scores, sizes = run.answering_model(result.model, result.accuracy, result.trained)
        run.finish_stage("ntsnet", model, acc, scores, result.trained, sizes)
