"""RTMDet in plain PyTorch: the network, official checkpoints, and batched inference."""
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.classes import COCO_CLASSES
from model.config import MODEL_SPECS, SIZES, TestConfig
from model.inference.detector import Detections, Detector
from model.nn.rtmdet import RTMDet, build_rtmdet, fused_for_inference

__all__ = ["COCO_CLASSES", "MODEL_SPECS", "SIZES", "CheckpointError", "Detections", "Detector", "RTMDet",
           "TestConfig", "build_rtmdet", "fused_for_inference", "load_checkpoint", "save_checkpoint"]
