"""memlm.tasks: synthetic tasks that measure what a memory does, beside the corpora's bits per byte.

    from memlm.tasks import recall_accuracy, recall_markdown, RecallStreams
    result = recall_accuracy(model, distances=(64, 1024))    # long-range recall by distance
    print(recall_markdown(result))
    loader = RecallStreams(8, 256, distances=(64, 1024))     # training streams of its documents

`longrange`: the recall task's documents and scoring; `recall_streams`: training on them
(`memlm train --task recall`).
"""

from memlm.tasks.longrange import (DISTANCES, RecallDocument, distances_for, filler, make_documents, recall_accuracy,
                                   recall_by_mode, recall_markdown, score_documents)
from memlm.tasks.recall_streams import IGNORE, TARGETS, RecallStreams, spread_distance

__all__ = ["DISTANCES", "IGNORE", "TARGETS", "RecallDocument", "RecallStreams", "distances_for", "filler",
           "make_documents", "recall_accuracy", "recall_by_mode", "recall_markdown", "score_documents",
           "spread_distance"]
