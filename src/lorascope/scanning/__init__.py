"""Scanning: pair base and tuned matrices, run Alg. 1 on each, gather a ``ScanResult``.

options (settings) → pairing → engine (the one loop) → analyze (one pair); cache and distributed
plug into the engine; api is ``lorascope.scan``. Submodules are imported where used, so that
importing this package costs nothing.
"""
