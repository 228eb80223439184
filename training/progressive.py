"""The Train button: a progressive job in which every stage starts from the previous one, and the model that
answers in Recognise only ever gets better.

    python -m training train --db data --out runs/r1 [--max-minutes 10]        # this recipe (the default)
    python -m training train --db data --out runs/p1 --recipe paper ...          # the paper's single-stage recipe
    torchrun --nproc_per_node 2 -m training train --db data --out runs/d1         # DDP (training/distributed.py)

1. linear   (training/stages/linear.py, seconds): frozen ImageNet backbone, a linear head on cached features of
            augmented views, initialised from the products' prototypes (it answers as the instant model does).
2. finetune (stages/finetune.py, minutes): the classifier end to end at a small input size, store augmentation,
            CutMix; on a CPU the layers up to stride 8 stay frozen.
3. ntsnet   (stages/ntsnet.py): NTS-Net warm-started from stage 2 so its first prediction equals stage 2's, then
            L_I + L_S + L_C; 448/224 px on a GPU, on a CPU a size chosen from the time left and stage 2's speed.
4. refit    (stages/refit.py, small catalogues with test photos): the winning stage again on training + validation
            photos; it replaces the winner only if at least as accurate on the test photos.

After each stage the model is evaluated on the validation photos and proposed to training/active.py: it answers
from then on if it is at least as accurate as what answers now (ProgressiveRun.finish_stage). Cancel stops the
current stage; whatever became active stays active.
"""
from __future__ import annotations

from dataclasses import dataclass

from .data import DataError

STAGES = ("linear", "finetune", "ntsnet")
REFIT_MAX_PHOTOS = 1000  # beyond this the validation photos add little (15% of many) and a second run costs much


@dataclass
class ProgressiveConfig:
    db: str = "data"
    out: str = "runs/run"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    max_minutes: float | None = None   # whole job, wall clock; None: 3 min + 1 min per 100 training photos, at most 30
    stages: str = ",".join(STAGES)
    input_size: int | None = None      # stage 2 (stage 3 too unless ntsnet_size); None: 224 on a CPU, 448 on a GPU
    cat_num: int = 4                   # K
    proposal_num: int = 6              # M
    views: int = 8                     # augmented views per photo for stage 1 (fewer when the catalogue is large)
    batch_size: int | None = None      # None: 16 on a CPU, a GPU's from its memory (training/feeding.py), lr scaled with it
    lr: float = 0.005                  # backbone, for a batch of 16; new heads get head_lr_mult times this
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    cutmix: float = 0.5                # stage 2: share of batches mixed with CutMix (training/cutmix.py)
    ema_share: float = 0.1             # stages 2-3 are judged on a moving average of their weights with this time
                                       # constant (a share of the stage's seconds); 0: the raw weights
    finetune_share: float = 0.45       # of the time left after stage 1; NTS-Net gets the rest
    ntsnet_size: int | None = None     # stage 3's input size (parts half of it); None: chosen (stages/ntsnet.py)
    min_steps: int = 30                # stages 2-3 (and a refit) take at least this many optimiser steps, even past the
                                       # budget: a busy or slow machine still gets a trained stage
    freeze_stride: int | None = None   # stages 2-3 keep the layers up to this stride frozen; 0: train all; None: 8 on a CPU, 0 on a GPU
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None         # None: 2 on a CPU, every core but two on a GPU
    seed: int = 0
    exclude_products: str = ""
    activate: bool = True              # propose each stage to the catalogue's active model
    refit: str = "auto"                # auto | on | off (auto: test photos and at most REFIT_MAX_PHOTOS train + val photos)

    def __post_init__(self):
        """A wrong setting is one clear line, before anything runs or the run directory exists."""
        stages = self.stage_list()
        if not stages or any(s not in STAGES for s in stages) or stages != [s for s in STAGES if s in stages]:
            raise DataError(f"--stages must be a comma-separated, ordered subset of {','.join(STAGES)}")
        checks = [
            (0 <= self.cutmix <= 1, f"--cutmix is the share of stage 2's batches mixed, from 0 (none) to 1 (all); got {self.cutmix}"),
            (self.ema_share >= 0, f"--ema-share must be 0 (no averaging) or a positive share of a stage, such as 0.1; got {self.ema_share}"),
            (0 < self.finetune_share < 1,
             f"--finetune-share is stage 2's share of the time left after stage 1, between 0 and 1; got {self.finetune_share}"),
            (self.ntsnet_size is None or (64 <= self.ntsnet_size <= 1024 and self.ntsnet_size % 32 == 0),
             f"--ntsnet-size is stage 3's input size in pixels, a multiple of 32 from 64 to 1024; got {self.ntsnet_size}"),
            (self.min_steps >= 0, f"--min-steps must be 0 (the budget alone ends a stage) or a number of optimiser steps; got {self.min_steps}"),
            (self.refit in ("auto", "on", "off"), f"--refit must be auto, on or off; got {self.refit!r}"),
            (self.freeze_stride is None or self.freeze_stride >= 0,
             f"--freeze-stride must be 0 (train every layer) or a stride such as 4, 8, 16; got {self.freeze_stride}"),
            (self.max_minutes is None or self.max_minutes >= 0, f"--max-minutes must not be negative; got {self.max_minutes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]


def auto_minutes(n_train: int) -> float:
    """The default budget: 3 minutes and one more per 100 training photos, at most 30."""
    return min(30.0, 3.0 + n_train / 100.0)


def train_progressive(cfg: ProgressiveConfig, log=print) -> dict:
    """Run the whole job (every stage in ``cfg.stages``, then a refit where wanted); returns its summary."""
    from .run_state import ProgressiveRun

    return run_job(ProgressiveRun(cfg, log))


def run_job(run) -> dict:
    """The job as a plain sequence over one ProgressiveRun: what answers now, then each stage from the last."""
    from .stages import finetune, linear, ntsnet, refit

    run.measure_bar()
    classifier = linear.run(run)
    classifier = finetune.run(run, classifier)
    ntsnet.run(run, classifier)
    refit.run(run)
    return run.finish()
