"""Cached log-probs of a frozen reference: computed once, stored beside the data, reused.

A frozen reference scores every pair identically in every epoch and in every run of a sweep
(a beta sweep, other objectives on the same data), so its forward passes are done once. The
table is keyed by a fingerprint of everything its values depend on: the reference's weights,
the tokenized pairs (so the data, the tokenizer and the truncation settings), the batch layout
and the autocast dtype. It lives in `<data file>.refcache/<fingerprint>.safetensors` (or under
PREFALIGN_CACHE when the data's directory is read-only) and is written atomically, so a run
killed while writing leaves no partial table, and a resumed run finds the same fingerprint
(the checkpointed reference weights are the initial ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefalign.data.tokenize import TokenizedPair
from prefalign.io import cache_root
from prefalign.logprobs import SequenceLogps
from prefalign.reference import (
    REFERENCE_ADAPTER,
    FullReference,
    InitialPolicyReference,
    LoraReference,
    ReferencePolicy,
)
from prefalign.training.forward import PairLogps, live_reference_logps
from prefalign.training.fsdp import local_tensor

FORMAT = "prefalign-refcache-1"
FIELDS = ("chosen_sum", "chosen_n", "rejected_sum", "rejected_n")


def reference_tensors(reference: ReferencePolicy) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors a frozen reference's outputs depend on: the copy's (or the untrained policy's)
    state, or a LoRA policy's base plus its reference adapter (none when it is the bare base)."""
    if isinstance(reference, (FullReference, InitialPolicyReference)):
        return sorted(reference.model.state_dict().items())
    if isinstance(reference, LoraReference):  # the base, and the reference adapter if it has one
        state = reference.model.state_dict()
        return sorted(
            (k, v)
            for k, v in state.items()
            if "lora_" not in k or REFERENCE_ADAPTER in k.split(".")
        )
    raise TypeError(f"no cache for a {type(reference).__name__}")


def fingerprint(
    reference: ReferencePolicy, examples: Sequence[TokenizedPair], settings: dict
) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for name, tensor in reference_tensors(reference):
        h.update(name.encode())
        h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        local = local_tensor(tensor).detach().cpu().contiguous().reshape(-1)
        h.update(local.view(torch.uint8).numpy().tobytes())
    for e in examples:
        for ids in (e.prompt_ids, e.chosen_ids, e.rejected_ids):
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
    digest = h.hexdigest()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Sharded weights: each process hashed its own shards; the key covers all of them.
        digests: list[str] = [""] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return digest[:32]


def cache_path(data_path: str | Path, key: str) -> Path:
    """`<data>.refcache/<key>.safetensors`, or under PREFALIGN_CACHE where that cannot be made."""
    data_path = Path(data_path)
    beside = data_path.with_name(data_path.name + ".refcache")
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside / f"{key}.safetensors"
    except OSError:
        pass
    root = cache_root() / "refcache"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{key}.safetensors"


class CachedReferenceLogps:
    """Reference log-probs of a batch looked up by its `index` rows: no forward pass."""

    def __init__(self, table: dict[str, torch.Tensor], path: Path) -> None:
        self.table, self.path = table, path

    def __call__(self, batch: dict) -> PairLogps:
        index = batch["index"].cpu()
        device = batch["index"].device
        t = {k: v[index].to(device) for k, v in self.table.items()}
        chosen = SequenceLogps(t["chosen_sum"], t["chosen_n"])
        return chosen, SequenceLogps(t["rejected_sum"], t["rejected_n"])


def build_reference_cache(
    reference: ReferencePolicy,
    examples: Sequence[TokenizedPair],
    collate: Callable[[list[int]], dict],
    data_path: str | Path,
    accelerator,
    batch_size: int,
    settings: dict,
    log: Callable[[str], None] = print,
) -> CachedReferenceLogps:
    """Load the table for this fingerprint, or compute it (each process a stripe of the pairs,
    under the run's autocast) and write it once."""
    key = fingerprint(reference, examples, settings)
    path = cache_path(data_path, key)
    if path.exists():
        table = load_file(path)
        if all(table[f].shape == (len(examples),) for f in FIELDS):
            log(f"reference log-probs: read from {path}")
            return CachedReferenceLogps(table, path)
    score = live_reference_logps(reference)
    rank, world = accelerator.process_index, accelerator.num_processes
    order = sorted(range(len(examples)), key=lambda i: -examples[i].length)[rank::world]
    mine: dict[int, list[float]] = {}
    with accelerator.autocast():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate(indices).items()}
            chosen, rejected = score(batch)
            values = torch.stack(
                [chosen.sum, chosen.n_tokens, rejected.sum, rejected.n_tokens], dim=1
            )
            mine.update(zip(indices, values.float().cpu().tolist(), strict=True))
    if world > 1:
        from accelerate.utils import gather_object

        merged: dict[int, list[float]] = {}
        for part in gather_object([mine]):
            merged.update(part)
        mine = merged
    rows = torch.tensor([mine[i] for i in range(len(examples))], dtype=torch.float32)
    table = {f: rows[:, j].contiguous() for j, f in enumerate(FIELDS)}
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(table, tmp)
        tmp.replace(path)
        log(f"reference log-probs: computed for {len(examples)} pairs, saved to {path}")
    accelerator.wait_for_everyone()
    return CachedReferenceLogps(table, path)
