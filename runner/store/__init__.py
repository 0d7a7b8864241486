"""The step store: where committed steps live, and the one protocol every copy of a step follows (outputs first,
manifest last, every file verified before it is committed).

    local.py    the content-addressed cache on this machine: atomic commit, per-key locks, verify, quarantine; the only
                code that builds or parses a local store path
    gc.py       what `recipe cache gc` removes and what it keeps
    remote.py   push and pull of committed steps through an fsspec URL (s3://, gs://, file://, ...)

Import the modules themselves; this file imports nothing.
"""
