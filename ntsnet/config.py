"""The model's configuration: everything needed to rebuild an NTS-Net, stored inside every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


ANSWERS = ("scrutinizer", "all-heads")


@dataclass
class NTSConfig:
    model: str = "ntsnet"   # "ntsnet", or "baseline": the same backbone as a plain classifier (paper Table 1)
    backbone: str = "resnet50"
    num_classes: int = 2
    input_size: int = 448   # the whole image is resized to input_size x input_size (paper 2.3)
    part_size: int = 224    # each proposed part is resized to part_size x part_size for the Teacher
    proposal_num: int = 6   # M: parts the Navigator proposes and the Teacher scores during training
    cat_num: int = 4        # K: parts the Scrutinizer concatenates with the whole image (0 = whole image only)
    nms_iou: float = 0.25
    dropout: float = 0.5
    rank_weight: float = 1.0   # weight of L_I (the paper fixes it at 1)
    lambda_s: float = 1.0      # lambda in L_total = L_I + lambda L_S + mu L_C
    mu_c: float = 1.0          # mu
    # what a prediction is: "scrutinizer" (the paper: the Scrutinizer's logits alone) or "all-heads" (the mean of the
    # Scrutinizer's, the whole-image head's and the Teacher's part probabilities, all computed anyway; the progressive
    # job picks it only where it measures better on the validation photos)
    answer: str = "scrutinizer"

    def __post_init__(self):
        if self.model not in ("ntsnet", "baseline"):
            raise ValueError(f"model must be 'ntsnet' or 'baseline', not {self.model!r}")
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        if not 0 <= self.cat_num <= self.proposal_num:
            raise ValueError(f"cat_num (K={self.cat_num}) must be between 0 and proposal_num (M={self.proposal_num})")
        if self.proposal_num < 1:
            raise ValueError("proposal_num (M) must be at least 1: the Teacher needs parts to rank")
        if self.input_size < 32 or self.part_size < 32:
            raise ValueError("input_size and part_size must be at least 32 pixels")
        if self.answer not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}, not {self.answer!r}")
        if not 0 < self.nms_iou <= 1:
            raise ValueError("nms_iou must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NTSConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)
