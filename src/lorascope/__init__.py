"""lorascope: show, measure and undo how fine-tuning changes a pretrained model."""

__version__ = "0.1.0"
