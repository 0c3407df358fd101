"""Backends of the unroll engine. Each exposes ``unsupported(cell, x) -> str | None`` and ``run``.

``run(cell, x, state, masks, lengths, return_states) -> (outputs, final_state, states | None)``
takes time-major input ``x`` (T, N, I) already reversed where asked, ``masks`` (T, N, 1) bool or
None, and returns time-major outputs (not yet zeroed past each end; the engine does that).
"""
