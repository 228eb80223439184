"""NTS-Net (Navigator-Teacher-Scrutinizer) for fine-grained product recognition."""
from .anchors import generate_anchors, select_proposals
from .backbones import PretrainedWeightsUnavailable, create_backbone, list_backbones
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import NTSConfig
from .model import BaselineClassifier, NTSNet, answer_probabilities, create_model, nts_loss, ranking_loss
from . import compiled
from .predictor import Box, Prediction, Predictor

__all__ = [
    "NTSConfig", "NTSNet", "BaselineClassifier", "answer_probabilities", "create_model", "nts_loss", "ranking_loss", "generate_anchors", "select_proposals",
    "create_backbone", "list_backbones", "PretrainedWeightsUnavailable", "save_checkpoint",
    "load_checkpoint", "CheckpointError", "Predictor", "Prediction", "Box",
]
