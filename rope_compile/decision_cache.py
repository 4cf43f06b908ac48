"""The pass's decisions, kept beside Inductor's FX graph cache, so reports stay true on a hit.

When Inductor's FX graph cache (or AOTAutograd's cache) serves a compiled graph, the post-grad
passes do not run: without this, ``counters["rope_compile"]`` would say ``pairs_found 0`` next
to generated code that calls the fused op. The backend keys each compile by what decides the
rewrite (the Dynamo graph's code, the example inputs' metadata, the Inductor patches and the
pass's ``uuid()``, which hashes every source of the pass and its lowering):

* when the pass ran, it stores the counters the compile added, under that key;
* when it did not (a cache hit), it adds the stored counters back, counts
  ``graphs_from_cache`` and says so at INFO.

Files live in ``<Inductor cache dir>/rope_compile_decisions/``; a missing or unreadable file
only means the report stays empty, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from torch._dynamo.utils import counters

log = logging.getLogger("rope_compile")


def decision_key(gm: torch.fx.GraphModule, example_inputs, patches: dict, pass_uuid) -> str:
    hasher = hashlib.sha256()
    hasher.update(gm.code.encode())
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            meta = (tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
        else:
            meta = (type(value).__name__,)
        hasher.update(repr(meta).encode())
    hasher.update(repr(sorted((k, repr(v)) for k, v in patches.items()
                              if k != "post_grad_custom_post_pass")).encode())
    hasher.update(repr(pass_uuid).encode())
    return hasher.hexdigest()


def _folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "rope_compile_decisions"


def snapshot() -> Counter:
    return Counter(dict(counters["rope_compile"]))


def record_or_replay(key: str, before: Counter, pass_ran: bool) -> None:
    """After a compile: store what the pass decided, or report it again on a cache hit."""
    path = _folder() / f"{key}.json"
    if pass_ran:
        added = Counter(dict(counters["rope_compile"]))
        added.subtract(before)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in added.items() if v}))
            tmp.replace(path)
        except OSError as err:
            log.debug("rope_compile: could not store the pass's decisions: %r", err)
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        log.info("rope_compile: the compiled graph came from a cache and the pass did not run; "
                 "no record of its decisions was found")
        return
    for name, value in stored.items():
        counters["rope_compile"][name] += int(value)
    counters["rope_compile"]["graphs_from_cache"] += 1
    log.info("rope_compile: the compiled graph came from Inductor's cache (the pass did not "
             "run); its recorded decisions: %s", stored)
