"""The one loop: propose -> project -> evaluate -> judge -> record, for every job."""

from .job import Job, Judgement, Outcome, Step
from .master import LoopLimits, Master

__all__ = ["Job", "Judgement", "Outcome", "Step", "LoopLimits", "Master"]
