r"""NTS-Net: Navigator, Teacher and Scrutinizer around one shared backbone (Yang et al. 2018; paper section 2).

Data flow of one forward pass (B images, P parts):
  image (B,3,S,S) -> backbone -> feature map -> pooled whole-image feature -> raw logits    [C(X) in L_C]
                                   \-> Navigator (detached input) -> informativeness I of every anchor
  hard NMS on I -> P boxes -> crops (B*P,3,s,s; roi_align, crops.py) -> same backbone -> part features
  part features -> Teacher head -> part logits                                             [C(R_i) in L_C]
  top-K part features ++ whole-image feature -> Scrutinizer head -> final logits           [L_S]
Training uses P = M so the Teacher sees every proposal; inference only needs P = K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import DEFAULT_LEVELS, anchor_count, generate_anchors, select_proposals, suppression_table
from .backbones import create_backbone
from .config import ANSWERS, NTSConfig
from .crops import crop_boxes


class Navigator(nn.Module):
    """Scores every anchor's informativeness from three feature scales (strides 32, 64, 128)."""

    def __init__(self, in_channels: int, levels=DEFAULT_LEVELS, width: int = 128):
        super().__init__()
        self.down = nn.ModuleList([
            nn.Conv2d(in_channels, width, 3, 1, 1),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.Conv2d(width, width, 3, 2, 1),
        ])
        self.tidy = nn.ModuleList(nn.Conv2d(width, lv.per_cell, 1) for lv in levels)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        scores, x = [], fmap
        for down, tidy in zip(self.down, self.tidy):
            x = F.relu(down(x))
            scores.append(tidy(x).flatten(1))  # (channel, row, col) order, matching generate_anchors
        return torch.cat(scores, dim=1)


@dataclass
class NTSOutput:
    raw_logits: torch.Tensor      # (B, C)   whole image alone
    concat_logits: torch.Tensor   # (B, C)   Scrutinizer: the prediction
    part_logits: torch.Tensor     # (B, P, C) Teacher's classification of each part
    part_scores: torch.Tensor     # (B, P)   Navigator's informativeness I of each selected part
    part_boxes: torch.Tensor      # (B, P, 4) x0, y0, x1, y1 in input (resized) pixels
    part_index: torch.Tensor      # (B, P)   anchor indices
    part_features: torch.Tensor | None = None  # (B, P, C) what the Teacher and Scrutinizer read (live reuse, see forward)


def answer_probabilities(out: NTSOutput, answer: str = "scrutinizer") -> torch.Tensor:
    """(B, C) class probabilities of one forward pass. "all-heads" averages the Scrutinizer's, the whole-image
    head's and the Teacher's (its logits averaged over the parts) probabilities: three views of one photo that the
    network computes anyway, so the ensemble costs nothing; a model without parts has one head to ask."""
    if answer not in ANSWERS:  # before the shortcut below, so a wrong name fails on every model alike
        raise ValueError(f"unknown answer {answer!r}: one of {', '.join(ANSWERS)}")
    probs = out.concat_logits.float().softmax(1)
    if answer == "scrutinizer" or out.part_logits.shape[1] == 0:
        return probs
    return (probs + out.raw_logits.float().softmax(1) + out.part_logits.float().mean(1).softmax(1)) / 3


class NTSNet(nn.Module):
    def __init__(self, config: NTSConfig, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained=pretrained)
        c = self.backbone.out_channels
        self.dropout = nn.Dropout(config.dropout)
        self.raw_head = nn.Linear(c, config.num_classes)            # C(X): whole image
        self.navigator = Navigator(c)
        self.teacher_head = nn.Linear(c, config.num_classes)        # C(R): parts
        self.scrutinizer_head = nn.Linear(c * (config.cat_num + 1), config.num_classes)
        self.register_buffer("anchors", generate_anchors(config.input_size), persistent=False)
        self.num_anchors = anchor_count(config.input_size)

    def suppression_table(self, device: torch.device):
        """The anchors' NMS table (see anchors.suppression_table), built on first use: a numpy array on a CPU, a
        bool tensor on any other device (select_on_device: the whole batch at once, nothing read back)."""
        key = (self.config.input_size, self.config.nms_iou, str(device))
        if getattr(self, "_table_key", None) != key:
            table = suppression_table(generate_anchors(self.config.input_size), self.config.nms_iou)  # also for a model on "meta"
            self._table = table if device.type == "cpu" else torch.from_numpy(table).to(device)
            self._table_key = key
        return self._table

    @property
    def mean(self):
        return self.backbone.mean

    @property
    def std(self):
        return self.backbone.std

    def whole_and_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole-image feature (B, C) and the Navigator's score of every anchor (B, A): the first of the two
        backbone passes, and what a compiled engine exports as one graph."""
        fmap = self.backbone(x)
        # The Navigator learns only from the ranking loss; detaching keeps L_I out of the backbone (reference design).
        return fmap.float().mean((2, 3)), self.navigator(fmap.detach()).float()

    def part_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C) of part crops: the second backbone pass, the other exported graph."""
        return self.backbone(crops).float().mean((2, 3))

    @staticmethod
    def rois(boxes: torch.Tensor) -> torch.Tensor:
        """(B, P, 4) boxes -> (B*P, 5) rows of (image index, x0, y0, x1, y1), the form roi_align takes."""
        b, p, _ = boxes.shape
        index = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(p)[:, None]
        return torch.cat([index, boxes.reshape(-1, 4)], dim=1)

    def crop_parts(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """All B*P crops (roi_align, aligned); outside the image reads as 0 (the reference zero-pads)."""
        return crop_boxes(x, rois, self.config.part_size)

    def forward(self, x: torch.Tensor, num_parts: int | None = None, engine=None, reuse=None) -> NTSOutput:
        """``engine``: an object with ``whole_and_scores`` and ``part_features`` computing the same functions
        elsewhere (a compiled runtime, see compiled.py); NMS, crops and heads stay here, so both share this code.
        ``reuse``: (part_index, part_features) of an earlier frame; when the Navigator picks exactly the same
        anchors again (a product held still), those part features are used instead of a second backbone pass."""
        cfg = self.config
        if num_parts is None:
            num_parts = cfg.proposal_num if self.training else cfg.cat_num
        if num_parts < cfg.cat_num:
            raise ValueError(f"need at least K={cfg.cat_num} parts, got num_parts={num_parts}")
        if tuple(x.shape[-2:]) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"expected input {cfg.input_size}x{cfg.input_size}, got {tuple(x.shape[-2:])}")
        engine = engine or self
        b = x.shape[0]
        whole, scores = engine.whole_and_scores(x)
        raw_logits = self.raw_head(self.dropout(whole))
        if scores.shape[1] != self.num_anchors:
            raise RuntimeError(f"Navigator produced {scores.shape[1]} scores for {self.num_anchors} anchors")
        index = select_proposals(scores, self.anchors, num_parts, cfg.nms_iou, table=self.suppression_table(scores.device))
        part_scores = scores.gather(1, index)
        boxes = self.anchors[index]  # (B, P, 4)
        if num_parts == 0:
            empty = whole.new_zeros(b, 0, cfg.num_classes)
            return NTSOutput(raw_logits, self.scrutinizer_head(self.dropout(whole)), empty, part_scores, boxes, index)
        if reuse is not None and reuse[0].shape == index.shape and torch.equal(reuse[0], index):
            part_feat = reuse[1]
        else:
            part_feat = engine.part_features(self.crop_parts(x, self.rois(boxes))).view(b, num_parts, -1)
        part_logits = self.teacher_head(self.dropout(part_feat))
        concat = torch.cat([part_feat[:, : cfg.cat_num].flatten(1), whole], dim=1)
        concat_logits = self.scrutinizer_head(self.dropout(concat))
        return NTSOutput(raw_logits, concat_logits, part_logits, part_scores, boxes, index, part_feat)


class BaselineClassifier(nn.Module):
    """The same backbone as a plain fine-tuned classifier: the paper's ResNet-50 row in Table 1.

    Returns an NTSOutput with no parts so training, checkpoints, the predictor and evaluation treat both alike.
    """

    def __init__(self, config: NTSConfig, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, pretrained=pretrained)
        self.dropout = nn.Dropout(config.dropout)
        self.raw_head = nn.Linear(self.backbone.out_channels, config.num_classes)

    mean = NTSNet.mean
    std = NTSNet.std

    def whole_and_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.backbone(x).float().mean((2, 3)), None

    def forward(self, x: torch.Tensor, num_parts: int | None = None, engine=None, reuse=None) -> NTSOutput:
        whole, _ = (engine or self).whole_and_scores(x)  # no parts: nothing to reuse
        logits = self.raw_head(self.dropout(whole))
        b = x.shape[0]
        none = logits.new_zeros(b, 0)
        return NTSOutput(logits, logits, logits.new_zeros(b, 0, logits.shape[1]), none, logits.new_zeros(b, 0, 4), none.long())


def create_model(config: NTSConfig, pretrained: bool = True) -> nn.Module:
    return (NTSNet if config.model == "ntsnet" else BaselineClassifier)(config, pretrained=pretrained)


def ranking_loss(scores: torch.Tensor, confidence_loss: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3, L_I = sum over pairs with C_i < C_s of max(0, 1 - (I_s - I_i)), averaged over the batch.

    ``confidence_loss`` is the Teacher's cross-entropy per part: a lower loss means a higher confidence C.
    """
    conf_lower = confidence_loss.unsqueeze(2) > confidence_loss.unsqueeze(1)     # [b, i, s]: C_i < C_s
    margin = F.relu(1 - (scores.unsqueeze(1) - scores.unsqueeze(2)))            # [b, i, s]: f(I_s - I_i)
    return (margin * conf_lower).sum() / scores.shape[0]


def nts_loss(out: NTSOutput, labels: torch.Tensor, config: NTSConfig, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """L_total = L_I + lambda L_S + mu L_C (eq. 6), with every term reported.

    L_C averages the parts' cross-entropy (as the reference implementation does) rather than summing it,
    so its scale does not grow with M; the whole-image term is added on top.
    """
    b, p, c = out.part_logits.shape
    smooth = label_smoothing
    l_raw = F.cross_entropy(out.raw_logits.float(), labels, label_smoothing=smooth)
    l_s = F.cross_entropy(out.concat_logits.float(), labels, label_smoothing=smooth)
    if config.model == "baseline":
        zero = l_s.new_zeros(())
        return {"total": l_s, "L_I": zero, "L_S": l_s.detach(), "L_C": zero, "L_raw": zero, "L_parts": zero}
    if p:
        flat_logits, flat_labels = out.part_logits.float().reshape(b * p, c), labels.repeat_interleave(p)
        l_parts = F.cross_entropy(flat_logits, flat_labels, label_smoothing=smooth)
        # the ranking target is the Teacher's unsmoothed confidence in the true class
        part_ce = F.cross_entropy(flat_logits.detach(), flat_labels, reduction="none").view(b, p)
        l_i = ranking_loss(out.part_scores, part_ce)
    else:
        l_parts = l_i = l_s.new_zeros(())
    l_c = l_parts + l_raw
    total = config.rank_weight * l_i + config.lambda_s * l_s + config.mu_c * l_c
    return {"total": total, "L_I": l_i.detach(), "L_S": l_s.detach(), "L_C": l_c.detach(), "L_raw": l_raw.detach(), "L_parts": l_parts.detach()}
