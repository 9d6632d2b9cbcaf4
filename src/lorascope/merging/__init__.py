"""Merging: combine several adapters of one base into one update per matrix, with the intruders in view.

options (``MergeOptions``, torch-free) → api (``lorascope.merge``: pairs, streams matrices) →
methods (one pure function per method on one matrix's updates) → writers (a PEFT LoRA adapter at the
rank the merge needs, or a merged model) ; analysis (``--scan``: intruders and their attribution).
"""
