"""SiT on timm: token slimming (TSM), its training-only inverse (RTSM), FRD distillation,
peer reducers and honest measurement. Importing this package registers the `sit_*` models
with timm. Pure PyTorch + timm: nothing here knows about Ray or MLflow."""
from . import lvvit, registry  # noqa: F401  (registers the models with timm)
from .card import card_job, load_card, read_card, write_card
from .distill import FRDDistiller, FRDOutput, LoadReport, student_from_teacher
from .loss import FRDLoss
from .patch import apply_slimming, check_slimmable, slim_schedule, tokens_per_block
from .schedule import PAPER_SCHEDULES, SlimSchedule, as_schedule, paper_schedule
from .slimming import ReverseTokenSlimming, TokenSlimming

__all__ = [
    "SlimSchedule", "as_schedule", "PAPER_SCHEDULES", "paper_schedule", "apply_slimming", "check_slimmable",
    "slim_schedule", "tokens_per_block",
    "TokenSlimming", "ReverseTokenSlimming", "FRDLoss", "FRDDistiller", "FRDOutput", "LoadReport",
    "student_from_teacher", "write_card", "read_card", "load_card", "card_job",
]
