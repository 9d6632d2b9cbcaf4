"""Mitigation: scale intruder dimensions by λ (paper §5) and write a working adapter or model.

api (``lorascope.mitigate``) → spectral.edit (the maths) → writers (adapter or merged model).
"""
