"""The interception core: architecture discovery, cache layers, attention wrapper, capture, ledger, session.

    arch.py       where each layer's attention and pre-RoPE keys are; head geometry; apply_rope
    cache.py      KVLabCache / KVLabLayer: the cache layer that hands K/V to the session; TokenSpans
    attention.py  the attention-function wrapper: eviction masks, attention statistics
    capture.py    Recorder: per-layer buffers for `kvlab.capture`
    ledger.py     Ledger: bits and errors per layer and tensor; summaries
    session.py    Session: installs the hooks and dispatches to the protocol policy and the clients
"""
