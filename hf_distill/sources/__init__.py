"""Teacher sources: each yields the teacher tensors of a batch (see :class:`TeacherSource`).

* ``frozen``: a live teacher model (or several), frozen, run at every step;
* ``stored``: teacher outputs stored in the dataset (logits or top-k + tail mass), no teacher in memory;
* ``ema``: an exponential moving average of the student (self-distillation);
* ``snapshot``: the student as it was at the end of the previous epoch (born-again networks);
* ``peer``: the teacher models are trained in the same run (deep mutual learning, or a trainable
  teacher fine-tuned on the task while it teaches).

Choose one with ``--teacher_source`` (default ``auto``: ``frozen`` when a teacher is given, else
``stored``) or pass ``teacher_source=`` an instance in code.
"""

from .base import TeacherSource
from .frozen import FrozenTeacher
from .online import PeerTeacher
from .self_distillation import EmaTeacher, SnapshotTeacher
from .stored import STORED_COLUMNS, StoredTeacher

SOURCE_KINDS = ("auto", "frozen", "stored", "peer", "ema", "snapshot")

__all__ = ["SOURCE_KINDS", "STORED_COLUMNS", "EmaTeacher", "FrozenTeacher", "PeerTeacher", "SnapshotTeacher", "StoredTeacher",
           "TeacherSource"]
