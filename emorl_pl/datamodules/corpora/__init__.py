"""Corpus converters: one pure planning function per corpus (metadata -> splits), written by ``convert``.

Planning imports no torch, so tests and tools can check splits on full manifests cheaply.
"""

from emorl_pl.datamodules.corpora.common import Plan, PlannedUtterance
from emorl_pl.datamodules.corpora.cremad import plan_cremad
from emorl_pl.datamodules.corpora.emobox import find_emobox_files, plan_emobox
from emorl_pl.datamodules.corpora.iemocap import plan_iemocap
from emorl_pl.datamodules.corpora.meld import plan_meld
from emorl_pl.datamodules.corpora.ravdess import plan_ravdess
from emorl_pl.datamodules.corpora.savee import plan_savee
from emorl_pl.datamodules.corpora.table import plan_table

__all__ = ["Plan", "PlannedUtterance", "find_emobox_files", "plan_cremad", "plan_emobox", "plan_iemocap",
           "plan_meld", "plan_ravdess", "plan_savee", "plan_table"]
