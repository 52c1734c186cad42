"""Prepare: one base-model pass over the reference set that records, per sample, whether the base model
answers it and its routing (the bank), and fills the prefix cache on the way."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..distributed import LOCAL
from ..errors import UserError
from ..progress import Progress
from . import roma
from .bank import Bank
from .data import Record, batches, predictions
from .evaluate import check_finite
from .lengths import encode_fitting
from .prefix_cache import PrefixCache
from .tasks import Prompting, source_sha256


def records_sha256(records: list[Record], prompting: Prompting | None = None) -> str:
    """Identity of a data set's content as it is asked (independent of file formatting); today's plain
    records asked in mc without examples keep the identity they always had."""
    h = hashlib.sha256()
    for r in records:
        value = [r.question, list(r.choices), r.answer] + ([] if r.simple else [r.context, r.cloze])
        h.update(json.dumps(value, ensure_ascii=False).encode())
        h.update(b"\n")
    asked = (prompting or Prompting()).fingerprint()
    if asked is not None:
        h.update(json.dumps(asked, sort_keys=True).encode())
    return h.hexdigest()


def prepare(
    model,
    records: list[Record],
    embeddings: np.ndarray,
    layers,
    batch_size: int = 32,
    encoded=None,
    cache: PrefixCache | None = None,
    data_file=None,
    progress="auto",
    dist=LOCAL,
    prompting: Prompting | None = None,
) -> Bank:
    """Run the base model once: per sample, answered correctly? and its last-token routing.

    ``layers``: the tuned layers (a tuple) or how many of the last MoE layers. Fills ``cache`` on the way.
    ``dist``: under torchrun each rank runs its own records and the bank rows are summed across ranks
    (rows a rank does not own are zero there), so every rank returns the whole bank.
    ``prompting``: the format and few-shot examples (tasks.Prompting) the records are asked with; a
    sample is answered correctly when its answer scores highest (acc).
    """
    layers = roma.tuned_layers(model.spec, layers)
    if len(embeddings) != len(records):
        raise UserError(f"the embeddings have {len(embeddings)} rows but the data has {len(records)} records")
    encoded = encoded or encode_fitting(model, records, data_file, prompting)
    correct = np.zeros(len(records), dtype=np.uint8)
    routing = np.zeros((len(records), len(layers), model.spec.moe_at(layers[0]).num_experts), dtype=np.float32)
    rows = dist.owned(len(records))
    bar = Progress(len(rows), "prepare", progress if dist.is_main else "off", unit="records")
    for batch in batches(encoded, rows, batch_size):
        hidden = model.prefix_hidden(batch, layers[0])
        scores, r = model.suffix_scores(hidden, batch, layers[0], layers)
        check_finite(scores, r, batch, records, data_file)
        correct[batch.index] = predictions(scores) == batch.answers
        routing[batch.index] = r
        if cache is not None:
            cache.put(batch, hidden)
        bar.update(batch.size)
    correct, routing = dist.sum([correct, routing])
    bar.close(f"prepare: {int(correct.sum())} of {len(records)} answered correctly by the base model")
    meta = {
        "fingerprint": model.spec.fingerprint(layers),
        "layers": list(layers),
        "data_file": None if data_file is None else str(data_file),
        "data_sha256": records_sha256(records, prompting),
        "records": len(records),
        "correct": int(correct.sum()),
    }
    if (prompting or Prompting()).fingerprint() is not None:
        meta["prompting"] = prompting.fingerprint()
    if data_file is not None:
        meta["data_file_sha256"] = source_sha256(data_file)
    return Bank(correct, routing, np.asarray(embeddings, dtype=np.float32), meta)
