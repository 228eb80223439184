"""The Train button: a progressive job in which every stage starts from the previous one, and the model that
answers in Recognise only ever gets better.

    python -m training train --db data --out runs/r1 [--max-minutes 10]        # this recipe (the default)
    python -m training train --db data --out runs/p1 --recipe paper ...          # the paper's single-stage recipe
    torchrun --nproc_per_node 2 -m training train --db data --out runs/d1         # DDP (training/distributed.py)

1. linear   (seconds): frozen ImageNet backbone, a linear head on cached features of several augmented views of
            each photo, initialised from the products' prototypes (weight imprinting: before any step it answers
            exactly as the instant prototype model does).
2. finetune (minutes): the network end to end at a small input size, from stage 1's head; warm-up then
            cosine schedule over the time budget, 10x learning rate for the head, label smoothing, store
            augmentation (training/data.py: framing, rotation, perspective, light, darkness, blur, tiny images),
            half of the batches mixed with CutMix (training/cutmix.py). On a CPU the layers up to stride 8 stay
            frozen: about twice the photos per minute.
3. ntsnet:  NTS-Net warm-started from stage 2 so its first prediction equals stage 2's at the same input size
            (Teacher head and the whole-image slice of the Scrutinizer take the fine-tuned head, the part slices
            start at zero), then trained with L_I + L_S + L_C. 448/224 px on a GPU; on a CPU 9/7 of the stage-2
            size (288/144) when the time left and stage 2's measured speed allow two epochs there, else 224/112.

4. refit    (small catalogues with test photos): the winning stage 2 or 3 again, from its starting weights for its
            time, on training + validation photos; it replaces the winner only if at least as accurate on the test
            photos, the only ones neither trained on.

After each stage the model is evaluated on the validation photos and proposed to training/active.py: it answers
from then on if it is at least as accurate as what answers now (the instant model or an earlier model, measured
on the same photos). A stage that never beat its own starting weights is saved but not proposed (it would answer
as the model before it). Cancel stops the current stage; whatever became active stays active.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ntsnet import NTSConfig, answer_probabilities, create_model, nts_loss, save_checkpoint
from ntsnet.config import ANSWERS
from ntsnet.checkpoint import atomic_write
from ntsnet.fuse import TrainingFold
from ntsnet.images import to_input_tensor
from ntsnet.predictor import resolve_device
from ntsnet.runtime import keep_freed_memory, opencv_on_one_thread

from . import active, distributed
from .cutmix import cutmix, mixed_losses
from .data import DataError, PhotoDataset, Snapshot, collate, load_rgb, take_snapshot
from .openset import threshold_record
from .train import choose_precision

STAGES = ("linear", "finetune", "ntsnet")


@dataclass
class ProgressiveConfig:
    db: str = "data"
    out: str = "runs/run"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    max_minutes: float | None = None   # whole job; None: 3 min + 1 min per 100 training photos, at most 30
    stages: str = ",".join(STAGES)
    input_size: int | None = None      # stage 2 (stage 3 too unless ntsnet_size); None: 224 on a CPU, 448 on a GPU
    cat_num: int = 4                   # K
    proposal_num: int = 6              # M
    views: int = 8                     # augmented views per photo for stage 1 (fewer when the catalogue is large)
    batch_size: int = 16
    lr: float = 0.005                  # backbone; new heads get head_lr_mult times this
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    cutmix: float = 0.5                # stage 2: share of batches mixed with CutMix (training/cutmix.py; full set 85.5/86.5/84.5% vs 83.1-84.5%)
    ntsnet_cutmix: float = 0.0         # stage 3's share: 0.5 was no better in two clicks (README, 2026-11-29 18:16 and 20:40)
    ema_share: float = 0.1             # stages 2-3 are judged on a moving average of their weights with this time constant
                                       # (a share of the stage's seconds); 0: the raw weights
    finetune_share: float = 0.45       # of the time left after stage 1; NTS-Net gets the rest (stage 2 plateaus: 27 epochs gained 0.7 points over 14)
    ntsnet_size: int | None = None     # stage 3's input size (parts half of it); None: chosen from the time left and the speed
                                       # stage 2 measured (ntsnet_input_size)
    min_steps: int = 30                # stages 2-3 (and a refit) take at least this many optimiser steps, even past the budget:
                                       # a busy or slow machine still gets a trained stage, not a skipped or 3-step one
    freeze_stride: int | None = None   # stages 2-3 keep the layers up to this stride frozen; 0: train all; None: 8 on a CPU, 0 on a GPU
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    seed: int = 0
    exclude_products: str = ""
    activate: bool = True              # propose each stage to the catalogue's active model
    refit: str = "auto"                # auto | on | off: train the winning stage again on training + validation photos
                                       # (auto: a catalogue with test photos and at most REFIT_MAX_PHOTOS training + validation photos)


REFIT_MAX_PHOTOS = 1000  # beyond this the validation photos add little (15% of many) and a second run costs much


def resolve_freeze_stride(requested: int | None, device: torch.device) -> int:
    """None: 8 on a CPU (the early, high-resolution layers cost half of a training step there and change least in
    fine-tuning: frozen, stage 2 sees ~1.8x more photos in its minutes), 0 (train everything) on a GPU."""
    if requested is None:
        return 0 if device.type == "cuda" else 8
    if requested < 0:
        raise DataError(f"--freeze-stride must be 0 (train every layer) or a stride such as 4, 8, 16; got {requested}")
    return requested


def auto_minutes(n_train: int) -> float:
    return min(30.0, 3.0 + n_train / 100.0)


# --------------------------------------------------------------------------------------------- helpers
class _Stop:
    """Cancel by flag file (the job runner) or SIGTERM; checked between steps."""

    def __init__(self, run_dir: Path):
        self.file, self.signalled = run_dir / "CANCEL", False
        with contextlib.suppress(ValueError):  # only possible in the main thread
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))

    def __bool__(self):
        return self.signalled or self.file.exists()


def _write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def _load_arrays(items, paths: list | None = None) -> tuple[list[np.ndarray], list[int]]:
    """The readable photos as RGB arrays, and their labels; ``paths``: a list that gets each kept photo's path."""
    arrays, labels = [], []
    for it in items:
        im = load_rgb(it["path"])
        if im is not None:
            arrays.append(np.array(im))
            labels.append(it["label"])
            if paths is not None:
                paths.append(it["path"])
    return arrays, labels


def photos_trained_on(extra: dict) -> set[str] | None:
    """The photos (catalogue paths: content-addressed, so a path is always the same pixels) a model of this project
    trained on: its run's training photos, and its validation photos too for a refit; None when that is unknown."""
    snap_path = Path(str(extra.get("run_dir", ""))) / "snapshot.json"
    if not extra.get("run_dir") or not snap_path.exists():
        return None
    snap = Snapshot.load(snap_path)
    return {it["path"] for split in extra.get("trained_on", ["train"]) for it in getattr(snap, split, [])}


def refit_wanted(cfg: ProgressiveConfig, snap: Snapshot) -> tuple[bool, str]:
    """Whether to train the winning stage again on training + validation photos, and why (not)."""
    if cfg.refit == "off":
        return False, "refit off"
    if not snap.val or not snap.test:
        return False, "no refit: it needs validation photos to add and test photos to measure it on"
    if cfg.refit == "auto" and len(snap.train) + len(snap.val) > REFIT_MAX_PHOTOS:
        return False, f"no refit: more than {REFIT_MAX_PHOTOS} photos, the validation photos would add little"
    return True, f"refit on {len(snap.train)} training + {len(snap.val)} validation photos, measured on {len(snap.test)} test photos"


@torch.inference_mode()
def pooled_features(backbone, arrays, size: int, engine=None, batch: int = 32) -> torch.Tensor:
    """(N, C) pooled backbone features of RGB arrays resized to ``size``; ``engine``: compiled graphs, if any."""
    out = []
    for start in range(0, len(arrays), batch):
        x = to_input_tensor(arrays[start:start + batch], size, backbone.mean, backbone.std)
        if engine is not None:
            out.append(engine.run("pooled", x)[0])
        else:
            out.append(backbone(x.contiguous(memory_format=torch.channels_last)).float().mean((2, 3)))
    return torch.cat(out) if out else torch.zeros(0, backbone.out_channels)


def imprinted_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.nn.Linear:
    """A linear head whose argmax equals the prototype classifier's: each class's weight is the normalised mean
    of its normalised features, scaled so that logits span a useful range (cosine x ~10)."""
    unit = F.normalize(features, dim=1)
    protos = torch.stack([unit[labels == c].mean(0) if (labels == c).any() else torch.zeros(unit.shape[1]) for c in range(num_classes)])
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(F.normalize(protos, dim=1) * (10.0 / features.norm(dim=1).mean().clamp_min(1e-6)))
        head.bias.zero_()
    return head


def prototype_predictions(train_feats, train_labels, feats, num_classes) -> torch.Tensor:
    """The instant model's rule (ntsnet/instant.py): highest cosine similarity to a product's prototype."""
    unit = F.normalize(train_feats, dim=1)
    protos = torch.stack([F.normalize(unit[train_labels == c].mean(0), dim=0) if (train_labels == c).any()
                          else torch.zeros(unit.shape[1]) for c in range(num_classes)])
    return (F.normalize(feats, dim=1) @ protos.T).argmax(1)


def prototype_accuracy(train_feats, train_labels, feats, labels, num_classes) -> float:
    """The instant model's top-1 accuracy as correct / n, the same exact fraction ``evaluate_answers`` gives a
    stage: a float32 mean rounds 18/26 up, and a stage that ties the instant model would lose the gate."""
    if not len(labels):
        return float("nan")
    hits = prototype_predictions(train_feats, train_labels, feats, num_classes) == torch.as_tensor(labels)
    return int(hits.sum()) / len(labels)


def fit_head(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.01,
             weight_decay: float = 1e-3, label_smoothing: float = 0.1) -> torch.nn.Linear:
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randperm(len(labels), generator=g)[:4096]
        loss = F.cross_entropy(head(feats[idx]), labels[idx], label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
    return head


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


# ------------------------------------------------------------------------------------------ evaluation
def answers_of(model) -> tuple[str, ...]:
    """The answers a model can give (see answer_probabilities): a classifier has only its one head."""
    return ANSWERS if model.config.model == "ntsnet" and model.config.cat_num else ("scrutinizer",)


@torch.inference_mode()
def answer_predictions(model, arrays, batch: int = 16) -> dict[str, tuple[list[int], list[float]]]:
    """For every answer the model can give, from one forward pass per batch: each photo's predicted class and its
    probability."""
    model.eval()
    size, answers = model.config.input_size, answers_of(model)
    out = {a: ([], []) for a in answers}
    for start in range(0, len(arrays), batch):
        x = to_input_tensor(arrays[start:start + batch], size, model.mean, model.std).contiguous(memory_format=torch.channels_last)
        logits = model(x, num_parts=model.config.cat_num if model.config.model == "ntsnet" else None)
        for a in answers:
            conf, pred = answer_probabilities(logits, a).max(1)
            out[a][0].extend(pred.tolist())
            out[a][1].extend(conf.tolist())
    return out


def evaluate_answers(model, arrays, labels, batch: int = 16) -> dict[str, tuple[float, list[float]]]:
    """For every answer the model can give, from one forward pass per batch: top-1 accuracy on the validation
    photos and each photo's max probability (for the unknown threshold)."""
    return {a: ((sum(p == y for p, y in zip(preds, labels)) / len(labels)) if labels else float("nan"), scores)
            for a, (preds, scores) in answer_predictions(model, arrays, batch).items()}


def evaluate_model(model, arrays, labels, batch: int = 16) -> tuple[float, list[float]]:
    """Top-1 accuracy of the model's own answer and each photo's max probability."""
    answers = evaluate_answers(model, arrays, labels, batch)
    return answers.get(model.config.answer, answers["scrutinizer"])


def selection_accuracy(model, arrays, labels, batch: int = 16) -> float:
    """What a stage is judged on while it trains: the top-1 accuracy of its best answer at the training size. The
    answer and size it will give are chosen after (choose_test_size); judging NTS-Net on the Scrutinizer alone
    discarded trained weights whose all-heads answer was the better one (a Lite1 stage 3, 2026-11-29)."""
    return max(acc for acc, _ in evaluate_answers(model, arrays, labels, batch).values())


def candidate_sizes(train_size: int) -> list[int]:
    """Input sizes worth trying at test time for a model trained at ``train_size``: random framing during
    training shows products larger than a plain resize of the whole photo does, so such a model often recognises
    best at a somewhat larger input (Touvron et al., "Fixing the train-test resolution discrepancy", 2019);
    1, 8/7 and 9/7 of the training size, in multiples of 32."""
    return sorted({train_size, *(max(32, round(train_size * f / 32) * 32) for f in (8 / 7, 9 / 7))})


NTSNET_COST = 3.0            # NTS-Net (K=4 parts at half the size) per photo, in classifier photos at the same size:
                             # 9.5-10 against 28-29 images/s in the AVX2 EPYC's clicks (README)
LARGER_MIN_EPOCHS = 2.0      # what NTS-Net needs at a size its start was not trained at before it pays: on the full grocery
LARGER_MIN_PHOTOS = 5000     # set at 288 px it read 83.8% after one epoch (79.4% at its start), 86.1% after two (README)


def ntsnet_input_size(train_size: int, seconds_at, classifier_speed: float | None, n_train: int, on_gpu: bool = False) -> tuple[int, str]:
    """Stage 3's input size and why. Stage 2 trains the classifier at ``train_size``; NTS-Net may train at 9/7 of
    it (224 -> 288 px, parts 144) when the time left is enough for it to adapt to the new size: at least
    LARGER_MIN_EPOCHS epochs and LARGER_MIN_PHOTOS photos at the speed stage 2 measured on this machine
    (``classifier_speed``, photos/s) scaled by NTS-Net's cost and the pixels. ``seconds_at(size)``: stage 3's
    seconds if it trains at ``size`` (its test sizes cost more at a larger size). A GPU trains the paper's 448
    px in both stages already; without a measured speed (no stage 2) the size stays."""
    if on_gpu or not classifier_speed:
        return train_size, f"{train_size} px, stage 2's size"
    larger = max(candidate_sizes(train_size))  # the largest size stage 2's weights are measured at
    seconds = seconds_at(larger)
    photos = classifier_speed / NTSNET_COST * (train_size / larger) ** 2 * seconds
    needed = max(LARGER_MIN_EPOCHS * n_train, LARGER_MIN_PHOTOS)
    why = (f"about {photos:.0f} photos at {larger} px in {seconds:.0f} s at the {classifier_speed:.1f} photos/s stage 2 "
           f"measured, {needed:.0f} needed")
    return (larger, f"{larger} px: {why}") if photos >= needed else (train_size, f"{train_size} px, stage 2's size: {why}")


def at_input_size(model, size: int, answer: str | None = None):
    """The same weights answering at another input size (for NTS-Net the parts scale with it; its anchors are
    rebuilt for the new size, they are not weights), and with another ``answer`` if given."""
    cfg = model.config
    answer = answer or cfg.answer
    if size == cfg.input_size and answer == cfg.answer:
        return model
    part = max(32, round(size * cfg.part_size / cfg.input_size))
    resized = create_model(NTSConfig.from_dict({**cfg.to_dict(), "input_size": size, "part_size": part, "answer": answer}),
                           pretrained=False)
    resized.load_state_dict(model.state_dict())
    return resized.to(memory_format=torch.channels_last).eval()


def choose_test_size(model, arrays, labels, log=print, evaluate=None) -> tuple[torch.nn.Module, float, list[float], dict]:
    """The input size (of ``candidate_sizes``) and, for NTS-Net, the answer (the Scrutinizer alone or all heads) at
    which the model recognises the validation photos best, clean and in the store conditions of the evaluation
    (dark, blurry, low-res; their mean accuracy decides; on a tie, the better clean accuracy, then the smaller, faster
    size and the paper's Scrutinizer). ``evaluate(model, arrays, labels)`` -> {answer: (accuracy, scores)}, one pass for all answers.
    Returns the model at that size and answer, its clean accuracy and scores, and every candidate's figures."""
    from .evaluate import CONDITIONS, apply_condition

    evaluate = evaluate or evaluate_answers
    conditioned = {c: [apply_condition(a, c) for a in arrays] for c in CONDITIONS}
    table, choices = {}, {}
    for size in candidate_sizes(model.config.input_size):
        candidate = at_input_size(model, size)
        results = {cond: evaluate(candidate, conditioned[cond], labels) for cond in CONDITIONS}
        for answer in answers_of(model):
            accs = {cond: results[cond][answer][0] for cond in CONDITIONS}
            key = str(size) if answer == "scrutinizer" else f"{size} {answer}"
            table[key] = {**{c: round(a, 5) for c, a in accs.items()}, "mean": round(float(np.mean(list(accs.values()))), 5)}
            choices[key] = (size, answer, accs, results["clean"][answer][1])
    best = best_answer({key: accs for key, (_, _, accs, _) in choices.items()})
    size, answer, accs, scores = choices[best]
    label = lambda key: key.replace(" ", " px, ", 1) if " " in key else key + " px"  # noqa: E731  "256 all-heads" -> "256 px, all-heads"
    log("test sizes: " + "; ".join(f"{label(k)} {r['clean']:.1%} clean, {r['mean']:.1%} mean of conditions" for k, r in table.items())
        + f" -> {label(best)}")
    return at_input_size(model, size, answer), accs["clean"], scores, table


def best_answer(accuracies: dict) -> object:
    """The choice (a key of ``accuracies``: {condition: accuracy}) with the best mean accuracy over the conditions; on a
    tie the better clean accuracy, then the earlier key (choose_test_size lists smaller sizes and the Scrutinizer first)."""
    best, best_mean, best_clean = None, -1.0, -1.0
    for key, accs in accuracies.items():
        mean = float(np.mean(list(accs.values())))
        if mean > best_mean + 1e-9 or (abs(mean - best_mean) <= 1e-9 and accs["clean"] > best_clean + 1e-9):
            best, best_mean, best_clean = key, mean, accs["clean"]
    return best


def accuracy_by_name(predictor, arrays, labels, class_names) -> float:
    """Accuracy of another model (different products, maybe) on these photos, compared by product name."""
    if not arrays:
        return float("nan")
    correct = 0
    for start in range(0, len(arrays), 16):
        for p, y in zip(predictor.predict_batch(arrays[start:start + 16]), labels[start:start + 16]):
            correct += (p.best_guess or p.label) == class_names[y]
    return correct / len(arrays)


# ---------------------------------------------------------------------------------------------- train
def _train_mode(model):
    """Training mode with every BatchNorm kept on its running statistics: with a few dozen photos per batch
    stream, batch statistics would move the features away from what the previous stage's head was fitted on
    (and from what inference sees), so a stage would start worse than the one it continues."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


class _WeightAverage:
    """An exponential moving average of the weights being trained, with a time constant in wall-clock seconds.
    Small batches of heavily augmented photos make SGD's weights jitter from step to step; the average is what
    gets evaluated and kept. A time (not step) constant makes it the same share of a stage on a slow or a fast
    machine. Starts from the stage's starting weights, so early on it leans towards them."""

    def __init__(self, model, tau_seconds: float):
        self.tau = max(tau_seconds, 1e-6)
        self.pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, step_seconds: float):
        weight = 1.0 - math.exp(-step_seconds / self.tau)
        for p, avg in self.pairs:
            avg.lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to_model(self):
        for p, avg in self.pairs:
            p.copy_(avg)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in place of the trained ones, for an evaluation or a copy."""
        saved = [p.detach().clone() for p, _ in self.pairs]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), keep in zip(self.pairs, saved):
                    p.copy_(keep)


def _fit(model, loss_fn, items, size, cfg: ProgressiveConfig, seconds: float, device, autocast, stop, progress, stage: str,
         val, log, head_lr_mult: float | None = None, cutmix_share: float = 0.0) -> tuple[torch.nn.Module, float, list[dict]]:
    """End-to-end training for ``seconds`` (time-based warm-up + cosine), evaluating on the validation photos
    at intervals and keeping the most accurate weights (the starting weights count as the first candidate).
    Returns (best model, its val accuracy, metric rows, whether the best weights are trained ones rather than
    the starting weights). ``cutmix_share``: the share of batches mixed (training/cutmix.py).
    ``val=None``: the validation photos are among ``items`` (a refit): nothing to select
    on, so the weights at the end of the schedule are returned, with accuracy NaN."""
    frozen = {id(p) for p in model.backbone.early_parameters(cfg.freeze_stride)} if cfg.freeze_stride else set()
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    body = [p for n, p in model.named_parameters() if n.startswith("backbone.") and id(p) not in frozen]
    base = [cfg.lr, cfg.lr * (cfg.head_lr_mult if head_lr_mult is None else head_lr_mult)]
    opt = torch.optim.SGD([{"params": body, "lr": base[0]}, {"params": heads, "lr": base[1]}], momentum=0.9,
                          weight_decay=cfg.weight_decay, nesterov=True)
    ds = PhotoDataset(items, size, train=True, seed=cfg.seed, mean=model.mean, std=model.std, augment="store")
    world, rank, _ = distributed.info()
    main = rank == 0
    if len(ds) < world:
        raise DataError(f"{len(ds)} training photos cannot be shared among {world} processes")
    net = distributed.wrap(model, device)
    select = val is not None
    val_arrays, val_labels = val if select else ([], [])
    best_acc = selection_accuracy(model, val_arrays, val_labels) if main and select else float("nan")
    best_state, rows, trained_best = copy.deepcopy(model.state_dict()) if select else None, [], not select
    if select:
        log(f"{stage}: starts at {best_acc:.1%} on the validation photos")
    average = _WeightAverage(model, cfg.ema_share * seconds) if cfg.ema_share > 0 else None
    param = next(model.backbone.parameters())
    fold = TrainingFold(model.backbone, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(param))
    t_start, trained, seen, steps, epoch, next_eval = time.perf_counter(), 0.0, 0, 0, 0, 0.0
    eval_every = max(seconds / 8, 20.0)  # evaluations cost time too
    mix_rng = np.random.default_rng([cfg.seed, rank])
    done = extended = False
    while not done:
        epoch += 1
        ds.epoch = epoch
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        order = distributed.shard(order, world, rank)
        # worker processes start anew every epoch: for a handful of photos that costs more than it saves
        workers = cfg.workers if len(order) >= 4 * cfg.batch_size else 0
        loader = torch.utils.data.DataLoader(ds, sampler=order, batch_size=cfg.batch_size, collate_fn=collate,
                                             num_workers=workers, drop_last=len(order) > cfg.batch_size)
        _train_mode(model)
        sums, n_seen, correct = {"total": 0.0, "L_I": 0.0, "L_S": 0.0, "L_C": 0.0}, 0, 0
        for x, y, _ in loader:
            t0 = time.perf_counter()
            frac = min(1.0, (t0 - t_start) / max(seconds, 1e-9))  # wall clock: loading and evaluating count against the budget
            if cfg.min_steps:  # the schedule ends with whichever comes last, the stage's seconds or its minimum of steps
                frac = min(frac, steps / cfg.min_steps)
            # spent: an evaluation or a new epoch's loader can run past the budget; then no step at the schedule's
            # lr 0 follows, and no second evaluation of the same weights (a started stage trains at least one step)
            spent = t0 - t_start >= seconds and steps >= max(cfg.min_steps, 1)
            halt, skip, frac = distributed.step_consensus(bool(stop) or spent, x is None, frac, device)  # anyone's cancel or clock
            if halt:
                done = True
                break
            if skip:
                continue
            warm = min(1.0, frac / 0.05)
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
            x, y = x.to(device), y.to(device)
            mixed = cutmix_share > 0 and mix_rng.random() < cutmix_share
            if mixed:
                x, partner, lam = cutmix(x, y, mix_rng)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(), fold:
                out = net(x)
            losses = mixed_losses(loss_fn, out, y, partner, lam) if mixed else loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # one bad batch must not undo a stage
            opt.step()
            if average is not None:
                average.update(time.perf_counter() - t0)
            trained += time.perf_counter() - t0
            steps += 1
            n_seen += len(y)
            seen += len(y)
            correct += int((out.concat_logits.argmax(1) == y).sum())
            for k in sums:
                sums[k] += float(losses[k].detach()) * len(y)
            progress(stage=stage, images_per_s=round(world * seen / max(trained, 1e-9), 2), stage_seconds_left=round(max(0.0, seconds - (time.perf_counter() - t_start)), 1),
                     loss={k: round(v / n_seen, 4) for k, v in sums.items()}, train_acc=round(correct / n_seen, 4))
            if distributed.agree(time.perf_counter() - t_start >= seconds and steps >= cfg.min_steps, device):
                done, extended = True, t0 - t_start >= seconds  # the budget was spent before this last step
                break
        if main and n_seen and (time.perf_counter() - t_start >= next_eval or done):
            next_eval = time.perf_counter() - t_start + eval_every
            with average.applied() if average is not None else contextlib.nullcontext():
                acc = selection_accuracy(model, val_arrays, val_labels) if select else float("nan")
                if select and acc >= best_acc:  # ties: the later, longer-trained weights
                    best_acc, best_state, trained_best = acc, copy.deepcopy(model.state_dict()), True
            row = {"stage": stage, "epoch": epoch, **{k: round(v / n_seen, 5) for k, v in sums.items()},
                   "train_acc": round(correct / n_seen, 5), "val_acc": round(acc, 5) if select else None, "val_n": len(val_labels),
                   "images_per_s": round(world * seen / max(trained, 1e-9), 2), "processes": world, "train_minutes": round(trained / 60, 3),
                   "elapsed_minutes": round((time.perf_counter() - t_start) / 60, 3)}
            rows.append(row)
            log(f"{stage} epoch {epoch}: loss {row['total']:.3f}, train acc {row['train_acc']:.3f}, "
                + (f"val acc {acc:.3f}, " if select else "") + f"{row['images_per_s']} img/s")
    if main and extended and cfg.min_steps:
        log(f"{stage}: its minimum of {cfg.min_steps} optimiser steps took {time.perf_counter() - t_start - seconds:.1f} s "
            f"more than its {seconds:.1f} s of the budget")
    agree = distributed.replicas_agree(model, device)
    if agree is not None:
        log(f"{stage}: {world} processes {'hold the same' if agree else 'DIFFER in their'} weights")
        for r in rows:
            r["replicas_agree"] = agree
    if select:
        model.load_state_dict(best_state)
    elif average is not None:  # a refit ends on the averaged weights, as the stage it repeats was judged on them
        average.copy_to_model()
    return model.eval(), best_acc, rows, trained_best


def train_progressive(cfg: ProgressiveConfig, log=print) -> dict:
    # settings first: a wrong one is one clear line, before the run directory exists
    stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages) or stages != [s for s in STAGES if s in stages]:
        raise DataError(f"--stages must be a comma-separated, ordered subset of {','.join(STAGES)}")
    for flag, share in (("--cutmix", cfg.cutmix), ("--ntsnet-cutmix", cfg.ntsnet_cutmix)):
        if not 0 <= share <= 1:
            raise DataError(f"{flag} is the share of the stage's batches mixed, from 0 (none) to 1 (all); got {share}")
    if not cfg.ema_share >= 0:
        raise DataError(f"--ema-share must be 0 (no averaging) or a positive share of a stage, such as 0.1; got {cfg.ema_share}")
    if not 0 < cfg.finetune_share < 1:
        raise DataError(f"--finetune-share is stage 2's share of the time left after stage 1, between 0 and 1; got {cfg.finetune_share}")
    if cfg.ntsnet_size is not None and not (64 <= cfg.ntsnet_size <= 1024 and cfg.ntsnet_size % 32 == 0):
        raise DataError(f"--ntsnet-size is stage 3's input size in pixels, a multiple of 32 from 64 to 1024; got {cfg.ntsnet_size}")
    if cfg.min_steps < 0:
        raise DataError(f"--min-steps must be 0 (the budget alone ends a stage) or a number of optimiser steps; got {cfg.min_steps}")
    if cfg.refit not in ("auto", "on", "off"):
        raise DataError(f"--refit must be auto, on or off; got {cfg.refit!r}")
    device = resolve_device(cfg.device)
    cfg.freeze_stride = resolve_freeze_stride(cfg.freeze_stride, device)
    world, rank, _ = distributed.info()
    main = rank == 0
    # the others wait while process 0 alone runs stage 1 and measures test sizes: a few minutes on a CPU
    device = distributed.start(device, timeout_minutes=max(60.0, 2 * (cfg.max_minutes or 30)))
    log = log if main else (lambda *a, **k: None)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_job = time.perf_counter()
    stop = _Stop(run_dir)
    if device.type == "cpu":
        keep_freed_memory()
    opencv_on_one_thread()  # before the first DataLoader forks its workers
    # "auto" on a CPU means fp32 even with AMX: this job's training (Lite0 at 224 px, layers to stride 8 frozen, BatchNorm
    # folded) ran slower in bf16 on a 2-core Sapphire Rapids, 22.3-23.3 against 24.5 images/s for the classifier and
    # 7.8-8.0 against 10.0 for NTS-Net 224/112 (benchmarks/train_throughput.py --fold --batch-size 16 --configs 0,4)
    precision = choose_precision(device, cfg.precision, bf16_on_cpu=False)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    snap_path = run_dir / "snapshot.json"
    if main:
        if not snap_path.exists():
            take_snapshot(cfg.db, exclude=[p.strip() for p in cfg.exclude_products.split(",") if p.strip()]).save(snap_path)
        _write_json(run_dir / "config.json", {**asdict(cfg), "recipe": "progressive", "model": "progressive", "processes": world})
    distributed.barrier()
    snap = Snapshot.load(snap_path)
    names, n_cls = snap.class_names, len(snap.class_names)
    val_items = snap.val or snap.test
    budget = (cfg.max_minutes if cfg.max_minutes else auto_minutes(len(snap.train))) * 60
    size = cfg.input_size or (448 if device.type == "cuda" else 224)
    state = {"state": "running", "recipe": "progressive", "stages": stages, "stage": "", "results": [], "budget_seconds": round(budget),
             "products": n_cls, "train_images": len(snap.train), "val_images": len(val_items), "device": str(device), "precision": precision,
             "processes": world}
    metrics: list[dict] = []

    def progress(**kw):
        if not main:
            return
        state.update(kw, updated=time.time(), pid=os.getpid(), elapsed_seconds=round(time.perf_counter() - t_job, 1),
                     eta_seconds=round(max(0.0, budget - (time.perf_counter() - t_job)), 1))
        _write_json(run_dir / "progress.json", state)

    def record(rows):
        if not main:
            return
        for r in rows:
            metrics.append({**r, "epoch": len(metrics) + 1})
        atomic_write(run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(m) + "\n" for m in metrics)))

    log(f"progressive training: {n_cls} products, {len(snap.train)} training / {len(val_items)} validation photos, "
        f"budget {budget / 60:.1f} min, stages {' -> '.join(stages)}, device {device} {precision}")
    from ntsnet import create_backbone

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained).eval().to(memory_format=torch.channels_last)
    # under torchrun the other processes only train: they get their photos from the dataset and their weights from DDP
    train_arrays, train_labels, val_arrays, val_labels, engine, bar, bar_name = [], [], [], [], None, float("nan"), ""
    gate = None  # (arrays, labels, description): photos the gate compares on when not all the validation photos
    instant_acc = float("nan")
    if main:
        progress(stage="loading photos")
        train_arrays, train_labels = _load_arrays(snap.train)
        val_paths: list[str] = []
        val_arrays, val_labels = _load_arrays(val_items, val_paths)
        if len(set(train_labels)) < 2:
            raise ValueError("training needs readable photos of at least two products")

        # what answers now, measured on this run's validation photos: the bar every stage must clear
        if device.type == "cpu":
            with contextlib.suppress(Exception):  # compiled features when OpenVINO is there; eager otherwise
                from ntsnet import compiled

                engine = compiled.embedder_graphs(backbone, size, compiled.state_key(backbone, "embedder", size))
        y_train, y_val = torch.as_tensor(train_labels), torch.as_tensor(val_labels)
        t0 = time.perf_counter()
        clean_train = pooled_features(backbone, train_arrays, size, engine)
        val_feats = pooled_features(backbone, val_arrays, size, engine)
        instant_acc = prototype_accuracy(clean_train, y_train, val_feats, y_val, n_cls)
        bar, bar_name = instant_acc, "instant model"
        current = active.read(cfg.db)
        if current and not str(current["checkpoint"]).startswith("hf://") and Path(current["checkpoint"]).exists():
            try:
                from ntsnet import Predictor

                prev = Predictor.from_checkpoint(current["checkpoint"], backend="torch")
                seen = photos_trained_on(prev.extra) or set()
                if any(p in seen for p in val_paths):
                    # it trained on some of these photos (a refit, or splits drawn anew): the active model, the instant
                    # model and every stage are compared on photos it never saw, else it would look better than it is
                    gate = _unseen_photos(seen, val_paths, val_arrays, val_labels, snap.test)
                    if gate is None:
                        log("the active model trained on every validation and test photo: comparing with the instant model")
                        prev_acc = -1.0
                    else:
                        feats = pooled_features(backbone, gate[0], size, engine)
                        bar = prototype_accuracy(clean_train, y_train, feats, gate[1], n_cls)
                        prev_acc = accuracy_by_name(prev, gate[0], gate[1], names)
                        log(f"comparing on {gate[2]}: instant model {bar:.1%}, active model {prev_acc:.1%}")
                else:
                    prev_acc = accuracy_by_name(prev, val_arrays, val_labels, names)
                if prev_acc > bar:
                    bar, bar_name = prev_acc, f"active model {active.short_name(current['checkpoint'])}"
                del prev
            except Exception as exc:  # an unreadable active model is no bar to clear
                log(f"could not measure the active model ({exc}); comparing with the instant model")
        state["instant_val_acc"] = instant_acc
        state["bar"] = {"val_acc": bar, "model": bar_name, **({"photos": gate[2]} if gate else {})}
        log(f"to beat: {bar_name} at {bar:.1%} on {gate[2] if gate else f'{len(val_labels)} validation photos'} "
            f"(instant model {instant_acc:.1%} on the validation photos)")
    best_path: Path | None = None
    winner = None  # this run's best trained end-to-end stage: what a refit trains again

    def promote(path: Path, acc: float, to_beat: float, **info) -> tuple[bool, str]:
        """The run's best so far: best.safetensors, its export built, then proposed as the catalogue's active model."""
        nonlocal best_path
        best_path = path
        atomic_write(run_dir / "best.safetensors", lambda tmp: Path(tmp).write_bytes(path.read_bytes()))
        if not cfg.activate:
            return False, "activation off"
        _prebuild_export(path, log)
        return active.propose(cfg.db, path, acc, to_beat, **info)

    starts = {}  # stage -> (starting weights, seconds, model config, head lr multiplier, CutMix share): what a refit repeats

    def trained_size(stage):
        """The input size a stage trained at (its saved model answers at its best test size): stage 3's may differ."""
        return starts[stage][2].input_size if stage in starts else size

    def finish_stage(stage, model, acc, scores, trained=True, sizes=None):
        """``trained``: False when the stage's best weights are the ones it started from: the same answers as the
        model before it (NTS-Net's Navigator still untrained, and slower), so it is saved but not proposed."""
        nonlocal bar, bar_name, winner
        gate_acc = acc if gate is None else evaluate_model(model, gate[0], gate[1])[0]
        path = run_dir / f"stage{STAGES.index(stage) + 1}-{stage}.safetensors"
        extra = {"stage": stage, "metrics": {"val_acc": acc, "val_n": len(val_labels)}, "class_count": n_cls,
                 "train_images": len(snap.train), "run_dir": str(run_dir), "train_config": asdict(cfg),
                 "unknown_threshold": threshold_record(scores), "train_input_size": trained_size(stage), "test_sizes": sizes}
        save_checkpoint(path, model, names, extra=extra)
        if not trained:
            switched, verdict = False, f"kept {bar_name}: training never beat the stage's starting point ({acc:.1%})"
        elif gate_acc >= bar:
            switched, verdict = promote(path, gate_acc, bar, val_n=len(val_labels), stage=stage)
            bar, bar_name = gate_acc, f"stage {stage}"
            if stage != "linear":
                winner = {"stage": stage, "model": model, "path": path, "active": switched}
        else:
            switched, verdict = False, f"kept {bar_name} ({gate_acc:.1%} < {bar:.1%})"
        state["results"].append({"stage": stage, "val_acc": acc, "active": switched, "verdict": verdict, "checkpoint": str(path),
                                 "input_size": model.config.input_size, "answer": model.config.answer, "test_sizes": sizes,
                                 **({"gate": {"acc": gate_acc, "photos": gate[2]}} if gate else {}),
                                 "minutes": round((time.perf_counter() - t_job) / 60, 2)})
        log(f"stage {stage}: validation accuracy {acc:.1%}: {verdict}")
        progress()

    def finish_refit(model, of: str):
        """The refit replaces the winner if it is at least as accurate on the test photos (neither trained on them)."""
        test_arrays, test_labels = _load_arrays(snap.test)
        win_acc = evaluate_model(winner["model"], test_arrays, test_labels)[0]
        acc, scores = evaluate_model(model, test_arrays, test_labels)
        path = run_dir / f"stage4-refit-{of}.safetensors"  # short name "run-... / refit-ntsnet": which model it is
        extra = {"stage": "refit", "refit_of": of, "trained_on": ["train", "val"], "class_count": n_cls,
                 "metrics": {"test_acc": acc, "test_n": len(test_labels), "replaced_test_acc": win_acc},
                 "train_images": len(snap.train) + len(snap.val), "run_dir": str(run_dir), "train_config": asdict(cfg),
                 "unknown_threshold": threshold_record(scores), "train_input_size": trained_size(of)}
        save_checkpoint(path, model, names, extra=extra)
        switched = False
        if acc < win_acc:
            verdict = f"kept stage {of} ({acc:.1%} < {win_acc:.1%} on {len(test_labels)} test photos)"
        elif not winner["active"]:
            verdict = f"stage {of} was not made active, so neither is its refit"
        else:
            switched, verdict = promote(path, acc, win_acc, test_n=len(test_labels), stage="refit", measured_on="test")
        state["results"].append({"stage": "refit", "refit_of": of, "val_acc": None, "test_acc": acc, "test_n": len(test_labels),
                                 "compared_with": {"stage": of, "test_acc": win_acc}, "active": switched, "verdict": verdict,
                                 "checkpoint": str(path), "input_size": model.config.input_size, "answer": model.config.answer,
                                 "minutes": round((time.perf_counter() - t_job) / 60, 2)})
        log(f"refit of {of}: {acc:.1%} on the test photos ({of}: {win_acc:.1%}): {verdict}")
        progress()

    # ---- stage 1: linear head on frozen features, imprinted from the prototypes
    classifier = None
    if "linear" in stages and main:
        progress(stage="linear")
        from PIL import Image

        from .data import store_augment

        # views until 5% of the budget is spent (augmenting costs as much as the features): a large catalogue gets fewer
        feats, labs, t_views, views = [clean_train], [y_train], time.perf_counter(), 1
        for v in range(1, cfg.views):
            per_view = (time.perf_counter() - t_views) / max(1, v - 1) if v > 1 else 0.0
            if v > 1 and (time.perf_counter() - t0) + per_view > 0.05 * budget:
                break
            progress(stage="linear", step=v, steps=cfg.views, stage_seconds_left=round(per_view * (cfg.views - v)))
            rng = np.random.default_rng([cfg.seed, 99, v])
            aug = [np.array(store_augment(Image.fromarray(a), rng, degrade=False)) for a in train_arrays]
            feats.append(pooled_features(backbone, aug, size, engine))
            labs.append(y_train)
            views += 1
            if stop:
                break
        feats, labs = torch.cat(feats), torch.cat(labs)
        head = fit_head(imprinted_head(clean_train, y_train, n_cls), feats, labs, label_smoothing=cfg.label_smoothing)
        classifier = _classifier(cfg, n_cls, size, backbone)
        classifier.raw_head.load_state_dict(head.state_dict())
        acc, scores = evaluate_model(classifier, val_arrays, val_labels)
        record([{"stage": "linear", "total": 0.0, "L_I": 0.0, "L_S": 0.0, "L_C": 0.0, "train_acc": None, "val_acc": round(acc, 5),
                 "val_n": len(val_labels), "views": views, "seconds": round(time.perf_counter() - t0, 1)}])
        log(f"linear: {views} views of {len(train_arrays)} photos in {time.perf_counter() - t0:.0f} s")
        finish_stage("linear", classifier, acc, scores)
    del engine

    def answering_model(model, acc, trained):
        """A trained stage at its best test size; one that never beat its start (not proposed) as it is."""
        if trained:
            return choose_test_size(model, val_arrays, val_labels, log)
        return model, acc, evaluate_model(model, val_arrays, val_labels)[1], None

    # ---- stage 2: end-to-end fine-tune of the classifier
    sizes_seconds, finetune_speed = 0.0, None
    left = lambda: budget - (time.perf_counter() - t_job)  # noqa: E731

    def starts_stage(stage: str) -> bool:
        """Stages 2-3 start unless cancelled; with a minimum of steps even when the budget is spent."""
        return stage in stages and distributed.agree(not stop and (left() > 3 or cfg.min_steps > 0), device)

    if starts_stage("finetune"):
        if classifier is None:
            classifier = _classifier(cfg, n_cls, size, backbone)
        # the rest: final evaluations, export; several processes all follow process 0's plan
        seconds = distributed.agree(max(0.0, left() * (cfg.finetune_share if "ntsnet" in stages else 0.9)), device)
        progress(stage="finetune", stage_seconds=round(seconds))
        model = _on(device, classifier)
        starts["finetune"] = (copy.deepcopy(model.state_dict()) if main else None, seconds, model.config, None, cfg.cutmix)
        loss_fn = lambda out, y: nts_loss(out, y, model.config, label_smoothing=cfg.label_smoothing)  # noqa: E731
        model, acc, rows, trained = _fit(model, loss_fn, snap.train, size, cfg, seconds, device, autocast, stop, progress, "finetune",
                                (val_arrays, val_labels), log, cutmix_share=cfg.cutmix)
        record(rows)
        finetune_speed = rows[-1]["images_per_s"] if rows else None
        classifier = model.cpu()
        if main:
            t_sizes = time.perf_counter()
            # stage 3 continues from the training size; the saved model answers at its best test size
            answering, acc, scores, sizes = answering_model(classifier, acc, trained)
            sizes_seconds = time.perf_counter() - t_sizes
            finish_stage("finetune", answering, acc, scores, trained, sizes)

    # ---- stage 3: NTS-Net warm-started from the classifier
    if starts_stage("ntsnet"):
        # time kept for its test sizes: NTS-Net costs about twice the classifier (K parts at half the size), more pixels more
        seconds_at = lambda s: max(0.0, left() * 0.9 - 2 * sizes_seconds * (s / size) ** 2)  # noqa: E731
        if cfg.ntsnet_size:
            nts_size, why = cfg.ntsnet_size, f"{cfg.ntsnet_size} px, asked for"
        else:
            nts_size, why = ntsnet_input_size(size, seconds_at, finetune_speed, len(snap.train), on_gpu=device.type == "cuda")
        nts_size = int(distributed.agree(nts_size, device))
        log(f"ntsnet: trains at {why}")
        nts_cfg = NTSConfig(model="ntsnet", backbone=cfg.backbone, num_classes=n_cls, input_size=nts_size,
                            part_size=max(32, nts_size // 2), proposal_num=cfg.proposal_num, cat_num=cfg.cat_num)
        if classifier is None:
            classifier = _classifier(cfg, n_cls, size, backbone)
        # at another size than stage 2's its first prediction is stage 2's classifier answering at that size
        model = _on(device, ntsnet_from_classifier(at_input_size(classifier, nts_size), nts_cfg))
        seconds = distributed.agree(seconds_at(nts_size), device)
        progress(stage="ntsnet", stage_seconds=round(seconds))
        starts["ntsnet"] = (copy.deepcopy(model.state_dict()) if main else None, seconds, nts_cfg, 1.0, cfg.ntsnet_cutmix)
        loss_fn = lambda out, y: nts_loss(out, y, nts_cfg, label_smoothing=cfg.label_smoothing)  # noqa: E731
        # the heads continue stage 2's (not new layers); the Navigator at a high rate lets the ranking loss diverge
        model, acc, rows, trained = _fit(model, loss_fn, snap.train, nts_size, cfg, seconds, device, autocast, stop, progress, "ntsnet",
                                (val_arrays, val_labels), log, head_lr_mult=1.0, cutmix_share=cfg.ntsnet_cutmix)
        record(rows)
        model = model.cpu()
        if main:
            model, acc, scores, sizes = answering_model(model, acc, trained)
            finish_stage("ntsnet", model, acc, scores, trained, sizes)

    # ---- refit: the winning stage again, from the same start for the same time, on training + validation photos
    # (few photos a product: 15% more to learn from); it can only be measured on the test photos, against the winner
    wanted, why = refit_wanted(cfg, snap)
    if main and winner is not None:
        log(why)
    refit_of = distributed.agree(STAGES.index(winner["stage"]) if main and winner and wanted and not stop else 0, device)
    if refit_of and not stop:
        stage = STAGES[int(refit_of)]
        start_state, seconds, model_cfg, head_lr_mult, cutmix_share = starts[stage]
        model = create_model(model_cfg, pretrained=False)
        if main:  # the others get process 0's weights from DDP
            model.load_state_dict(start_state)
        model = _on(device, model)
        budget += seconds  # the ETA counts it
        state["stages"] = stages + ["refit"]
        progress(stage="refit", stage_seconds=round(seconds), refit_of=stage)
        loss_fn = lambda out, y: nts_loss(out, y, model_cfg, label_smoothing=cfg.label_smoothing)  # noqa: E731
        model, _, rows, _ = _fit(model, loss_fn, snap.train + snap.val, model_cfg.input_size, cfg, seconds, device, autocast, stop, progress, "refit",
                                 None, log, head_lr_mult=head_lr_mult, cutmix_share=cutmix_share)
        record(rows)
        if main and not stop:
            finish_refit(at_input_size(model.cpu(), winner["model"].config.input_size, winner["model"].config.answer), stage)

    final = "cancelled" if distributed.agree(bool(stop), device) else "finished"
    distributed.finish()
    progress(state=final, stage="done", eta_seconds=0, stage_seconds_left=0)
    log(f"{final} after {(time.perf_counter() - t_job) / 60:.1f} min; "
        + "; ".join(f"{r['stage']} {r['val_acc'] if r['val_acc'] is not None else r['test_acc']:.1%}{' (active)' if r['active'] else ''}"
                    for r in state["results"]))
    return {"run_dir": str(run_dir), "state": final, "results": state["results"], "instant_val_acc": instant_acc,
            "best_checkpoint": str(best_path) if best_path else None}


def _unseen_photos(seen: set, val_paths, val_arrays, val_labels, test_items):
    """The validation photos a model never trained on, or else the test photos it never trained on, as
    (arrays, labels, description); None when it trained on all of them."""
    keep = [i for i, p in enumerate(val_paths) if p not in seen]
    if keep:
        return [val_arrays[i] for i in keep], [val_labels[i] for i in keep], f"the {len(keep)} validation photos it never trained on"
    arrays, labels = _load_arrays([it for it in test_items if it["path"] not in seen])
    return (arrays, labels, f"{len(labels)} test photos it never trained on") if labels else None


def _on(device: torch.device, model):
    """The model on the training device; NHWC on a CPU (oneDNN is faster in it, in fp32 too)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def _classifier(cfg: ProgressiveConfig, n_cls: int, size: int, backbone):
    """The plain classifier (stages 1-2) on a copy of ``backbone``'s weights, head still to be set."""
    model = create_model(NTSConfig(model="baseline", backbone=cfg.backbone, num_classes=n_cls, input_size=size, cat_num=0,
                                   proposal_num=1), pretrained=False)
    model.backbone.load_state_dict(backbone.state_dict())
    return model


def _prebuild_export(path: Path, log):
    """Compile the inference export before the app sees the model, so its first live frame does not wait."""
    try:
        from ntsnet import Predictor

        p = Predictor.from_checkpoint(path, background=False)
        if p.engine is None and p.build_error:
            log(f"compiled export not built ({p.build_error}); the app will answer with eager PyTorch")
    except Exception as exc:  # never let the export cost the model
        log(f"compiled export not built ({exc})")
